"""Export and eval against real vLLM (CPU) servers.

A draft is trained in the session (a few steps on the small SmolLM2 dump of the train tests), exported with
`dflashkit export`, and evaluated with `dflashkit eval --vllm`: one vLLM engine with the draft serves the same
tokenized prompts our loop decodes. A random draft exported with YaRN rope scaling gets a second, short engine start.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from dflashkit import serve
from dflashkit.eval.run import main as eval_main
from dflashkit.eval.vllm_metrics import VllmClient
from dflashkit.export import main as export_main
from dflashkit.serve import CPU_VLLM_ARGS, CPU_VLLM_ENV
from tests.helpers.server import assert_tau_agrees
from tests.helpers.train import MASK_TOKEN_ID

pytestmark = pytest.mark.integration
MAX_NEW_TOKENS = 24


@pytest.fixture(scope="module")
def trained(smollm2_dump, prepared, tmp_path_factory) -> dict[str, Path]:  # noqa: F811
    from dflashkit.config import load_config
    from dflashkit.train.config import TrainConfig
    from dflashkit.train.loop import train

    root = tmp_path_factory.mktemp("trained-draft")
    cfg = load_config(TrainConfig, None, [
        f"target_model={prepared['model']}", f"output_dir={root / 'train'}", f"data.dump_dirs=[{smollm2_dump}]",
        "model.num_layers=1", "model.block_size=4", f"model.mask_token_id={MASK_TOKEN_ID}", "data.num_anchors=32",
        "data.num_workers=0", "optim.max_steps=16", "optim.warmup_steps=2", "optim.lr=3e-3", "optim.epochs=4",
        "checkpoint_every=16", "tensorboard=false"])
    assert train(cfg, resume=False) == 0
    assert export_main(["--checkpoint", str(root / "train"), "--target", str(prepared["model"]),
                        "--out", str(root / "draft")]) == 0
    return {"train": root / "train", "draft": root / "draft"}


@pytest.fixture(scope="module")
def report(trained, prepared, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("eval")
    mtbench = prepared["mtbench"]
    with pytest.MonkeyPatch.context() as mp:
        for key, value in CPU_VLLM_ENV.items():
            mp.setenv(key, value)
        rc = eval_main([
            "--draft", str(trained["draft"]), "--target", str(prepared["model"]), "--out", str(out),
            "--mtbench", str(mtbench), "--limit", "2",
            "--heldout", str(mtbench), "--heldout-skip", "40", "--heldout-count", "1",  # past the 8 trained on
            "--max-new-tokens", str(MAX_NEW_TOKENS),
            "--vllm", "--vllm-extra-args", " ".join(CPU_VLLM_ARGS), "--vllm-startup-timeout", "600",
            "--train-log", str(trained["train"] / "metrics.jsonl")])
    result = json.loads((out / "report.json").read_text())
    result["_rc"], result["_out"] = rc, out
    return result


def test_trained_draft_serves_in_vllm_with_the_targets_greedy_output(report):
    """vLLM loaded the exported draft and speculated (drafts counted); its output is the target's own."""
    assert report["_rc"] == 0
    assert report["vllm"]["overall"]["steps"] > 0
    assert report["lossless"]["identical"] == report["lossless"]["prompts"] == 3  # our loop == target alone
    assert report["agreement"]["outputs_identical"] == 3  # vLLM with the draft == our loop == target alone
    rows = [json.loads(line) for line in (report["_out"] / "generations.jsonl").read_text().splitlines()]
    assert [r["category"] for r in rows].count("heldout") == 1
    assert all(len(r["vllm_output_ids"]) == MAX_NEW_TOKENS or r["vllm_output_ids"][-1] == 2 for r in rows)


def test_our_tau_equals_vllms(report):
    assert_tau_agrees(report["agreement"], "dflash")
    assert isinstance(report["agreement"]["vllm_norms_context_keys_per_layer"], bool)  # the server's vLLM asked
    ours, vllm = report["ours"], report["vllm"]
    assert set(ours["by_category"]) == set(vllm["by_category"]) == {"heldout", "writing"}
    assert sum(ours["overall"]["histogram"]) == ours["overall"]["steps"]


def test_plots(report):
    pytest.importorskip("matplotlib")
    names = sorted(p.name for p in (report["_out"] / "plots").iterdir())
    assert names == ["per_position_acceptance.png", "tau_by_category.png", "training_loss.png"]
    assert all((report["_out"] / "plots" / n).read_bytes()[:4] == b"\x89PNG" for n in names)


def test_random_draft_with_yarn_serves_in_vllm(prepared, tmp_path):
    """An untrained draft in the exported layout, with YaRN rope scaling, loads and serves; output is lossless."""
    import torch
    from transformers import AutoModelForCausalLM

    from dflashkit.eval.spec import SpeculativeDecoder
    from dflashkit.export import export_draft, load_draft
    from dflashkit.model import DFlashConfig, DFlashDraft

    target_config = json.loads((prepared["model"] / "config.json").read_text())
    cfg = DFlashConfig.for_target(target_config, num_hidden_layers=2, target_layer_ids=[1, 14, 27],
                                  mask_token_id=MASK_TOKEN_ID, block_size=4)
    torch.manual_seed(0)
    out = export_draft(cfg, DFlashDraft(cfg).state_dict(), prepared["model"], tmp_path / "draft", yarn_factor=2,
                       yarn_original_max_position=4096)
    assert json.loads((out / "config.json").read_text())["rope_scaling"]["rope_type"] == "yarn"
    prompt = [1, 504, 3458, 282, 4649, 314]  # "The capital of France is" with BOS
    target = AutoModelForCausalLM.from_pretrained(prepared["model"], dtype=torch.float32)
    expected = SpeculativeDecoder(target, load_draft(out)).generate_target_only(prompt, 8)
    spec = json.dumps({"method": "dflash", "model": str(out), "num_speculative_tokens": 3})
    with serve.running_server("vllm", str(prepared["model"]), "smollm2-dflash", tmp_path / "server.log",
                              extra_args=CPU_VLLM_ARGS + ["--speculative-config", spec], env=CPU_VLLM_ENV,
                              timeout=600) as server:
        client = VllmClient(server.url, server.api_key, server.model)
        assert client.complete(prompt, 8) == expected
        assert client.counters().drafts >= 7  # one verify step per token at least: every step drafted
