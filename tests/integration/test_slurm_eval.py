"""The eval stage (export + eval, one Python function) submitted by `dflashkit submit` through submitit on the test
cluster: it runs on a node, exports the run's checkpoint, evaluates it, writes its marker; status reads it; a
retrained draft makes it stale.

The checkpoint is a random 1-layer draft for the SmolLM2 target (training is tested elsewhere); the eval is one
MT-Bench prompt, 4 new tokens, our loop only, so the job takes seconds of compute.
"""
from __future__ import annotations

import json

import pytest
from safetensors.torch import save_file

from dflashkit.model import DFlashConfig, DFlashDraft
from dflashkit.shards import fingerprint, write_done_marker
from tests.helpers.procs import wait_until
from tests.helpers.slurm import DEMO, dflashkit, settled, status

pytestmark = pytest.mark.integration

EVAL = ["eval.args.vllm=false", "eval.args.per_category=null", "eval.args.limit=1", "eval.args.max_new_tokens=4",
        "eval.args.skip_lossless=true", "eval.slurm.time=00:10:00"]


def fake_training(run_dir, target, seed: int) -> None:
    """RUN/train as the train stage leaves it: a checkpoint named by latest.json, then its done-marker."""
    import torch

    torch.manual_seed(seed)
    cfg = DFlashConfig.for_target(json.loads((target / "config.json").read_text()), num_hidden_layers=1,
                                  target_layer_ids=[1, 15, 28], mask_token_id=16, block_size=4)
    step = run_dir / "train" / "checkpoints" / "step-00000001"
    step.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in DFlashDraft(cfg).state_dict().items()}, str(step / "model.safetensors"))
    (step / "config.json").write_text(cfg.to_json_string())
    (step.parent / "latest.json").write_text(json.dumps({"step": 1, "path": step.name}))
    write_done_marker(run_dir / "train" / "done.json", "train", None, {}, seed=seed)


def test_eval_stage_runs_through_submitit_and_goes_stale_with_a_new_draft(cluster, prepared, tmp_path):
    run_dir = tmp_path / "run"
    fake_training(run_dir, prepared["model"], seed=0)
    out = dflashkit("submit", "--recipe", str(DEMO), "--stages", "eval", "--executor", "slurm",
                    f"run.dir={run_dir}", *EVAL).stdout
    assert "eval: submitted job" in out
    st = wait_until("the eval job", lambda: settled(run_dir), timeout=400, every=2)
    shard = st["stages"]["eval"]["shards"][0]
    assert shard["state"] == "done", shard
    marker = json.loads((run_dir / "eval" / "done.json").read_text())
    assert marker["made_from"] == fingerprint(run_dir / "train")
    report = json.loads((run_dir / "eval" / "report.json").read_text())
    assert report, "eval wrote an empty report"
    assert (run_dir / "export" / "draft" / "model.safetensors").is_file()
    log = run_dir / "logs" / "eval" / f"{shard['job']}_0_log.out"  # submitit's log, where status points
    assert "eval" in log.read_text() and "export" in log.read_text()

    # A retrained draft makes it stale (rerun of a stale stage: tests/unit/test_stale_shards.py, local executor).
    (run_dir / "train" / "done.json").unlink()
    write_done_marker(run_dir / "train" / "done.json", "train", None, {}, seed=1)
    assert [s["state"] for s in status(run_dir)["stages"]["eval"]["shards"]] == ["stale"]
