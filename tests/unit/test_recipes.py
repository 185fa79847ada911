"""The recipe and the shipped recipes. The loader: the demo resolves; typos, wrong types and unset variables fail
with the key's path; each section translates to exactly what its stage script receives; one recipe per run dir.
The shipped recipes: each loads and is runnable as written (stage jobs build, dump flags parse with the dump
script's own parser, templates exist, train and dump agree on the sequence length); typos fail with the key path;
MiniMax-M3 renders exactly the documented server, dump and export command lines through the real builders and
refuses an fp8 KV cache; `plan` gives the dump size T x (n + 1) x H x 2 and GPU-hours only from measured figures."""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shlex
import subprocess
from pathlib import Path

import pytest

from dflashkit import plan as planner
from dflashkit.config import ConfigError
from dflashkit.dump.plan import PER_FILE_OVERHEAD
from dflashkit.recipe import ROOT, load_recipe, recipe_hash
from dflashkit.rundir import ManifestError, load_manifest, open_run
from dflashkit.serve import server_command, split_extra_args
from dflashkit.stages import StageUnavailable, flags, stage_job
from dflashkit.templates import read_template

RECIPES = sorted((ROOT / "configs").glob("*.yaml"))
M3 = ROOT / "configs" / "minimax-m3.yaml"
DEMO = ROOT / "configs" / "smollm2-demo.yaml"
DOC = (ROOT / "docs" / "RECIPES.md").read_text(encoding="utf-8")
M3_RUN = "/scratch/m3"


@pytest.fixture(autouse=True)
def cache(monkeypatch):
    from dflashkit.prepare import cache_dir

    monkeypatch.setenv("DFLASHKIT_CACHE", str(cache_dir()))
    return cache_dir()


# ---- the loader ----------------------------------------------------------------------------------------------

def test_demo_recipe_resolves_paths_and_worker_env(cache, tmp_path):
    r = load_recipe(DEMO, [f"run.dir={tmp_path / 'run'}", "generate.max_tokens=16"])
    assert r.model.path == f"{cache}/models/SmolLM2-135M-Instruct"
    assert r.generate.input == f"{cache}/prompts/mtbench.jsonl"
    env = r.generate.worker_env()
    assert env["MAX_TOKENS"] == "16" and env["THINKING_MODES"] == "enabled,disabled,adaptive"
    assert f"--chat-template '{ROOT}/configs/templates/smollm2-thinking.jinja'" in env["VLLM_SERVE_EXTRA_ARGS"]
    assert "TOP_P" not in env  # null keeps server_generate.py's default: defaults live in one place
    job = stage_job(r, r.run_dir(), "generate")
    assert job.env["OUTPUT_DIR"] == str(tmp_path / "run" / "generate") and job.env["NUM_SHARDS"] == "4"
    assert job.env["VLLM_CPU_KVCACHE_SPACE"] == "1" and job.env["DFLASHKIT_ROOT"] == str(ROOT)


# (recipe, override, what the one error line names): the demo's loader errors, then the M3 recipe's
KEY_ERRORS = [(DEMO, *case) for case in [
    ("generate.max_tokenz=3", "unknown key(s) generate.max_tokenz"),
    ("generate.slurm.trottle=2", "unknown key(s) generate.slurm.trottle"),
    ("generate.max_tokens=many", "generate.max_tokens: expected int"),
    ("generate.backend=tgi", "generate.backend: expected one of"),
    ("run.stages=[generate,export]", "unknown stage(s) ['export']"),
    ("train.config.optim.lr=fast", "train.config.optim.lr: expected float"),
    ("train.config.optim.lrr=0.1", "train.config.optim.lrr"),
    ("generate.thinking_mode_map={sometimes: true}", "thinking_mode_map names modes not in thinking_modes"),
]] + [(M3, *case) for case in [
    ("export.yarn_factor=big", "export.yarn_factor: expected float, got 'big'"),
    ("export.yarn_factor=null", "export.yarn_factor and export.yarn_original_max_position go together"),
    ("export.dtype=fp8", "export.dtype: expected one of"),
    ("model.hidden_size=wide", "model.hidden_size: expected int"),
]]


@pytest.mark.parametrize("recipe,override,message", KEY_ERRORS)
def test_errors_name_the_key(recipe, override, message):
    with pytest.raises(ConfigError) as e:
        load_recipe(recipe, [override])
    assert message in str(e.value)


def test_unset_variable_is_an_error_with_its_key(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model: {path: '${NO_SUCH_VARIABLE_X}/m'}\n")
    with pytest.raises(ConfigError, match=r"model.path: environment variable NO_SUCH_VARIABLE_X is not set"):
        load_recipe(path)


def test_flags_translation():
    assert flags({"max_seq_len": 512, "enforce_eager": True, "trust_remote_code": False, "tokenizer": None,
                  "target_layer_ids": [1, 9], "kwargs": {"a": 1}}) == [
        "--max-seq-len", "512", "--enforce-eager", "--target-layer-ids", "1", "9", "--kwargs", '{"a": 1}']


def test_dump_args_become_script_flags(tmp_path):
    r = load_recipe(DEMO, [f"run.dir={tmp_path}"])
    if not (ROOT / "compute_hidden_states_hf.py").exists():
        with pytest.raises(StageUnavailable, match="compute_hidden_states_hf.py is missing"):
            stage_job(r, r.run_dir(), "dump")
        return
    job = stage_job(r, r.run_dir(), "dump")
    assert job.args[:2] == ["--chat-template", "smollm2-thinking-train"]
    assert job.env["INPUT"] == str(tmp_path / "generate") and job.env["DUMP_BACKEND"] == "hf"


def test_manifest_and_one_recipe_per_run_dir(tmp_path):
    r = load_recipe(DEMO, [f"run.dir={tmp_path / 'run'}"])
    run_dir, _ = open_run(r, str(DEMO))
    m = load_manifest(run_dir)
    assert m["recipe_sha256"] == recipe_hash(r) and m["recipe"]["generate"]["num_shards"] == 4
    assert m["recipe_path"] == str(DEMO)
    assert open_run(r, str(DEMO))[1]["created_at"] == m["created_at"]  # same recipe: the same run
    changed = load_recipe(DEMO, [f"run.dir={tmp_path / 'run'}", "generate.max_tokens=17"])
    with pytest.raises(ManifestError, match="made with another recipe"):
        open_run(changed, str(DEMO))
    (run_dir / "manifest.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ManifestError, match="not a dflashkit.manifest/1"):
        load_manifest(run_dir)


# ---- the shipped recipes -------------------------------------------------------------------------------------

def test_the_four_recipes_are_there():
    assert {p.name for p in RECIPES} >= {"smollm2-demo.yaml", "qwen3-8b.yaml", "minimax-m2.7.yaml", "minimax-m3.yaml"}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_loads_and_every_stage_is_runnable(path, tmp_path):
    r = load_recipe(path, [f"run.dir={tmp_path}", "generate.input=/data/prompts.jsonl"])
    for stage in r.run.stages:
        stage_job(r, r.run_dir(), stage)
    split_extra_args(r.generate.vllm_serve_extra_args)  # what worker.sh will do with it
    dump = planner.dump_settings(r)  # the dump args parse with the dump script's own parser
    planner.eval_command(r)  # and the eval args with the eval's
    train = planner.check_train_config(r, r.run_dir())
    assert train["data"]["max_seq_len"] == dump.max_seq_len, "train and dump must cut at the same length"
    if r.export.yarn_original_max_position is not None:
        assert r.export.yarn_original_max_position == dump.max_seq_len, "YaRN extends the trained positions"
    try:
        if dump.chat_template is not None:  # None: the checkpoint's own template, its replies located
            read_template(dump.chat_template)
    except FileNotFoundError:
        pytest.skip(f"{path.name}: training template {dump.chat_template!r} is not in configs/templates/ yet")
    assert f"`configs/{path.name}`" in DOC, "every recipe gets a 'when to use' line in docs/RECIPES.md"


@pytest.mark.parametrize("typo,message", [
    ("allow_fp8_kv_cache:", "unknown key(s) model.allow_fp8_kv_cahce"),
    ("yarn_factor:", "unknown key(s) export.yarn_factr"),
    ("mask_token_id:", "unknown key(s) train.config.model.mask_tokn_id"),
    ("gpus_per_task: 8\n\ndump:", "unknown key(s) generate.slurm.gpus_per_tsk"),
])
def test_a_typo_in_the_m3_recipe_fails_with_its_key_path(typo, message, tmp_path):
    text = M3.read_text(encoding="utf-8")
    wrong = {"allow_fp8_kv_cache:": "allow_fp8_kv_cahce:", "yarn_factor:": "yarn_factr:",
             "mask_token_id:": "mask_tokn_id:", "gpus_per_task: 8\n\ndump:": "gpus_per_tsk: 8\n\ndump:"}[typo]
    assert text.count(typo) == 1
    bad = tmp_path / "m3.yaml"
    bad.write_text(text.replace(typo, wrong), encoding="utf-8")
    with pytest.raises(ConfigError) as e:
        load_recipe(bad)
    assert message in str(e.value)


@pytest.mark.parametrize("args", [
    "--block-size 128 --language-model-only --kv-cache-dtype fp8",
    "--block-size 128 --kv-cache-dtype=fp8_e4m3",
    "--kv_cache_dtype fp8_e5m2",
])
def test_m3_refuses_an_fp8_kv_cache(args):
    with pytest.raises(ConfigError) as e:
        load_recipe(M3, [f"generate.vllm_serve_extra_args={args}"])
    assert "generate.vllm_serve_extra_args sets" in str(e.value) and "MSA" in str(e.value)
    with pytest.raises(ConfigError, match="generate.sglang_serve_extra_args sets"):
        load_recipe(M3, ["generate.backend=sglang", f"generate.sglang_serve_extra_args={args}"])
    with pytest.raises(ConfigError, match="eval.args.vllm_extra_args sets"):
        load_recipe(M3, [f"eval.args.vllm_extra_args={args}"])


def test_fp8_kv_cache_stays_allowed_elsewhere():
    r = load_recipe(ROOT / "configs" / "qwen3-8b.yaml", ["generate.vllm_serve_extra_args=--kv-cache-dtype fp8"])
    assert r.model.allow_fp8_kv_cache
    load_recipe(M3, ["generate.vllm_serve_extra_args=--block-size 128 --kv-cache-dtype bfloat16"])


def documented(line_start: str) -> list[str]:
    """The command line of docs/RECIPES.md's code block that starts with `line_start`."""
    lines = [line for line in DOC.splitlines() if line.startswith(line_start)]
    assert len(lines) == 1, f"docs/RECIPES.md: expected one line starting {line_start!r}"
    return shlex.split(lines[0])


def test_m3_generate_server_command_is_the_documented_one():
    r = load_recipe(M3, [f"run.dir={M3_RUN}", "generate.input=/data/p.jsonl"])
    env = stage_job(r, r.run_dir(), "generate").env  # what worker.sh receives
    # worker.sh: `python -m dflashkit.serve command --model $MODEL --served-model-name $SERVED_MODEL_NAME --port P
    # --tp $TP_SIZE --extra-args "$VLLM_SERVE_EXTRA_ARGS"`, i.e. this call:
    cmd = server_command("vllm", env["MODEL"], 20000, env["SERVED_MODEL_NAME"], int(env["TP_SIZE"]),
                         extra_args=split_extra_args(env["VLLM_SERVE_EXTRA_ARGS"]), python="python")
    assert cmd == documented("python -m vllm.entrypoints.openai.api_server ")
    assert cmd[-3:] == ["--block-size", "128", "--language-model-only"]
    assert cmd[cmd.index("--tensor-parallel-size") + 1] == "8"
    assert env["THINKING_MODES"] == "enabled,disabled,adaptive" and env["THINKING_MODE_KEY"] == "thinking_mode"
    assert (env["THINK_OPEN_TAG"], env["THINK_CLOSE_TAG"]) == ("<mm:think>", "</mm:think>")
    assert "REASONING" not in env["VLLM_SERVE_EXTRA_ARGS"].upper()  # the reply must keep its think block


def test_m3_dump_command_is_the_documented_one(tmp_path):
    """Runs the real slurm/dump.sbatch with the environment and arguments `submit` gives it; a stand-in
    interpreter records the command line it execs and the RPC timeout it sees."""
    r = load_recipe(M3, [f"run.dir={M3_RUN}"])
    job = stage_job(r, r.run_dir(), "dump")
    record = tmp_path / "argv"
    recorder = tmp_path / "python"
    recorder.write_text(f'#!/bin/sh\nprintf "%s\\n" "$VLLM_RPC_TIMEOUT" "$@" > {record}\n')
    recorder.chmod(0o755)
    env = {**os.environ, **job.env, "PYTHON": str(recorder), "SLURM_ARRAY_TASK_ID": "3"}
    subprocess.run(["bash", str(job.script), *job.args], env=env, check=True, timeout=30)
    timeout, *argv = record.read_text().splitlines()
    assert timeout == "1800000"
    argv[0] = Path(argv[0]).relative_to(ROOT).as_posix()
    assert ["python", *argv] == documented("python compute_hidden_states_vllm.py ")
    parsed = planner.dump_settings(r)
    assert (parsed.block_size, parsed.tp, parsed.max_seq_len, parsed.num_draft_layers) == (128, 8, 8192, 5)
    assert parsed.chat_template is None, "M3's loss mask comes from the checkpoint's own template"
    assert parsed.language_model_only and parsed.enforce_eager


def test_m3_export_command_is_the_documented_one_and_gives_1m_positions(caplog):
    from dflashkit import export
    from dflashkit.model import DFlashConfig

    r = load_recipe(M3, [f"run.dir={M3_RUN}"])
    cmd = planner.export_command(r)
    assert cmd == documented("dflashkit export ")
    # The flags parse with the export's own parser: it gets as far as looking for the checkpoint.
    with caplog.at_level(logging.ERROR):
        assert export.main(cmd[2:]) == 2
    assert "/scratch/m3/train" in caplog.text
    draft = DFlashConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                         intermediate_size=128, vocab_size=200064, target_layer_ids=[1], num_target_layers=8,
                         mask_token_id=200061)

    def served(e):
        return export.serving_config(draft, yarn_factor=e.yarn_factor,
                                     yarn_original_max_position=e.yarn_original_max_position)

    assert served(r.export).max_position_embeddings == 1_048_576 and served(r.export).rope_scaling["factor"] == 128
    assert served(load_recipe(M3, ["export.yarn_factor=24"]).export).max_position_embeddings == 196_608


def test_m3_eval_command_is_the_documented_one():
    r = load_recipe(M3, [f"run.dir={M3_RUN}"])
    cmd = planner.eval_command(r)  # parsed by the eval's own parser on the way
    assert cmd == documented("dflashkit eval ")
    with pytest.raises(ConfigError, match="eval.args: not valid flags"):
        planner.eval_command(load_recipe(M3, ["eval.args.max_new_tokenz=3"]))


def test_m3_plan_bytes_per_sample(tmp_path):
    r = load_recipe(M3)
    rows, facts = planner.plan(r, 2_760_000, 8192, throughputs=tmp_path / "none.json")
    assert facts["hidden_state_bytes_per_conversation"] == 8192 * (5 + 1) * 6144 * 2 == 603_979_776
    dump = next(x for x in rows if x.stage == "dump")
    # + int64 ids and a uint8 mask per token, and torch.save's framing (the dump's own estimate, dump/plan.py)
    assert dump.disk_bytes == 2_760_000 * (603_979_776 + 8192 * 9 + PER_FILE_OVERHEAD)
    assert dump.shards == 256 and dump.gpus == 8
    assert all(x.gpu_hours is None for x in rows)
    assert planner.render(rows, facts, planner.export_command(r)).count(planner.NOT_MEASURED) == 3


def test_plan_takes_gpu_hours_only_from_measured_rows(tmp_path):
    bench = tmp_path / "throughputs.json"
    planner.record_throughput("MiniMaxAI/MiniMax-M3-MXFP8", "dump", 9_000, "8x H100", "first", bench)
    planner.record_throughput("MiniMaxAI/MiniMax-M3-MXFP8", "dump", 10_000, "8x H100", "again", bench)  # replaces
    planner.record_throughput("Qwen/Qwen3-8B", "generate", 5000, "1x H100", "other model", bench)
    assert len(json.loads(bench.read_text())) == 2
    rows, _ = planner.plan(load_recipe(M3), 1000, 8192, throughputs=bench)
    hours = {x.stage: x.gpu_hours for x in rows}
    assert math.isclose(hours["dump"], 1000 * 8192 / 10_000 / 3600)
    assert hours["generate"] is None and hours["train"] is None


def test_plan_counts_the_draft_the_trainer_builds(prepared):
    """With the target's config.json at hand, the checkpoint size follows the trainer's own draft."""
    import torch

    from dflashkit.config import from_dict
    from dflashkit.model import DFlashDraft
    from dflashkit.model.layers import default_target_layer_ids
    from dflashkit.train.config import TrainConfig
    from dflashkit.train.loop import draft_config

    r = load_recipe(ROOT / "configs" / "smollm2-demo.yaml")
    rows, facts = planner.plan(r, 16, 512, throughputs=Path("/nonexistent"))
    cfg = from_dict(TrainConfig, planner.check_train_config(r, r.run_dir()))
    meta = {"target_layer_ids": default_target_layer_ids(30, 1), "hidden_size": 576, "num_hidden_layers": 30}
    with torch.device("meta"):
        params = sum(p.numel() for p in DFlashDraft(draft_config(cfg, meta)).parameters())
    assert facts["draft_parameters"] == params and facts["hidden_size"] == 576 and facts["dtype"] == "float32"
    train = next(x for x in rows if x.stage == "train")
    assert train.disk_bytes == params * 12 * 2  # fp32 weights + two AdamW moments, keep_checkpoints 2


def test_plan_cli_prints_the_table(tmp_path, capsys):
    from dflashkit.cli import main

    assert main(["plan", str(M3), "--num-conversations", "2760000", "--mean-tokens", "8192",
                 "--throughputs", str(tmp_path / "none.json"), f"run.dir={M3_RUN}"]) == 0
    out = capsys.readouterr().out
    assert "603,979,776 B of hidden states" in out and "1.7 PB" in out and "not measured" in out
    modes = out[out.index("by training mode"):].splitlines()
    assert [line.split()[:2] for line in modes[2:5]] == [["offline", "bf16"], ["offline", "fp8"], ["online", "0"]]
    assert shlex.join(documented("dflashkit export ")) in out and shlex.join(documented("dflashkit eval ")) in out
    assert main(["plan", str(M3)]) == 2  # no conversation count: a clear error, not a guess
    assert "--num-conversations" in capsys.readouterr().err


def test_docs_list_every_recipe_key_with_its_default():
    import typing

    from dflashkit.recipe import Recipe

    def keys(cls, prefix):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                if f.name != "slurm":
                    yield from keys(hints[f.name], f"{prefix}{f.name}.")
            else:
                yield f"{prefix}{f.name}"

    missing = [k for k in keys(Recipe, "") if f"`{k}`" not in DOC]
    assert not missing, f"docs/RECIPES.md does not list {missing}"
