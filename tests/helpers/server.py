"""The session's test server (tests/conftest.py's `vllm_server`): the name it serves SmolLM2 under and its chat template;
and the check that our loop's tau equals vLLM's."""
from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SERVED_NAME = "smollm2"
THINKING_TEMPLATE = REPO / "configs" / "templates" / "smollm2-thinking.jinja"

# Our tau and vLLM's on the same prompts at T=0. Both count the same thing (verify steps, accepted drafts before the
# output is cut at max_tokens/EOS); they differ only where fp rounding differs between HF and vLLM kernels flips a
# near-tie, which changes one step's count. The same for DFlash and DSpark drafts.
TAU_TOLERANCE = 0.05


def assert_tau_agrees(agreement: dict, label: str) -> None:
    """`dflashkit eval --vllm`'s agreement block: tau and per-position acceptance within TAU_TOLERANCE (printed)."""
    a = agreement
    print(f"{label} tau ours {a['tau_ours']:.4f} vLLM {a['tau_vllm']:.4f} (diff {a['tau_abs_diff']:.4f}); identical "
          f"step counts {a['prompts_with_identical_step_counts']}/{a['prompts']}")
    assert a["tau_abs_diff"] <= TAU_TOLERANCE
    assert a["per_position_max_abs_diff"] <= TAU_TOLERANCE
