"""The bytes of a hidden-state dump, from token counts and the model's shape (`dflashkit plan` uses these).

A record stores per token: n target layers and, unless dumped with --no-final-state, the final state (H values each,
in the stored dtype; fp8 adds one float32 scale per stored layer), the int64 input id and a one-byte mask, so bytes =
T * (L_s * H * itemsize + L_s * scale + 9) plus a small constant of torch.save framing, L_s = n (+ 1).
MiniMax-M3 (H 6144, 5 target layers and the final state, bf16) at T = 8192: 8192 * 6 * 6144 * 2 = 604 MB.
"""
from __future__ import annotations

PER_FILE_OVERHEAD = 4096  # torch.save zip framing, 64-byte alignment and the pickled dict: ~2.3 KB measured
ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2, "float8_e4m3fn": 1}
SCALE_BYTES = {"float8_e4m3fn": 4}  # per token and stored layer (dump/format.py, quantize_fp8)


def dump_bytes(num_tokens: int, hidden: int, num_target_layers: int, dtype: str = "bfloat16",
               final_state: bool = True) -> int:
    """Bytes of one `<id>.pt` holding `num_tokens` tokens."""
    layers = num_target_layers + final_state
    per_token = layers * (hidden * ITEMSIZE[dtype] + SCALE_BYTES.get(dtype, 0)) + 8 + 1
    return num_tokens * per_token + PER_FILE_OVERHEAD


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    raise AssertionError
