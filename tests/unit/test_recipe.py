"""The recipe: the demo loads; typos, wrong types and unset variables fail with the key's path; each section
translates to exactly what its stage script receives."""
from __future__ import annotations

import json

import pytest

from dflashkit.config import ConfigError
from dflashkit.recipe import ROOT, load_recipe, recipe_hash
from dflashkit.rundir import ManifestError, load_manifest, open_run
from dflashkit.stages import StageUnavailable, flags, stage_job

DEMO = ROOT / "configs" / "smollm2-demo.yaml"


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DFLASHKIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


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


@pytest.mark.parametrize("override,message", [
    ("generate.max_tokenz=3", "unknown key(s) generate.max_tokenz"),
    ("generate.slurm.trottle=2", "unknown key(s) generate.slurm.trottle"),
    ("generate.max_tokens=many", "generate.max_tokens: expected int"),
    ("generate.backend=tgi", "generate.backend: expected one of"),
    ("run.stages=[generate,export]", "unknown stage(s) ['export']"),
    ("train.config.optim.lr=fast", "train.config.optim.lr: expected float"),
    ("train.config.optim.lrr=0.1", "train.config.optim.lrr"),
    ("generate.thinking_mode_map={sometimes: true}", "thinking_mode_map names modes not in thinking_modes"),
])
def test_errors_name_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_recipe(DEMO, [override])
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
