"""`dflashkit plan`: disk needed by a dump, before running it, from token counts and the model config.

A record stores per token: the final state and n target layers (H values each, in the model dtype), the int64 input
id and a one-byte mask, so bytes = T * ((n + 1) * H * itemsize + 9) plus a small constant of torch.save framing.
MiniMax-M3 (H 6144, 5 target layers, bf16) at T = 8192: 8192 * 6 * 6144 * 2 = 604 MB per conversation.
"""
from __future__ import annotations

import argparse
import json
import sys

from ..model.layers import default_target_layer_ids, hidden_size, num_hidden_layers
from .format import DTYPES

PER_FILE_OVERHEAD = 4096  # torch.save zip framing, 64-byte alignment and the pickled dict: ~2.3 KB measured
ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}


def dump_bytes(num_tokens: int, hidden: int, num_target_layers: int, dtype: str = "bfloat16") -> int:
    """Bytes of one `<id>.pt` holding `num_tokens` tokens."""
    per_token = (num_target_layers + 1) * hidden * ITEMSIZE[dtype] + 8 + 1
    return num_tokens * per_token + PER_FILE_OVERHEAD


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    raise AssertionError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dflashkit plan", description="Disk for a hidden-state dump, before running it.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="HF model dir or name (its config gives H and L)")
    src.add_argument("--hidden-size", type=int, help="H, when no config is at hand")
    p.add_argument("--num-layers", type=int, default=None, help="L (with --hidden-size)")
    p.add_argument("--num-draft-layers", type=int, default=5, help="number of target layers n")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--mean-tokens", type=float, required=True, help="mean tokens per conversation (after the cap)")
    p.add_argument("--max-seq-len", type=int, default=None, help="also show one conversation at this length")
    p.add_argument("--num-conversations", type=int, default=1)
    p.add_argument("--trust-remote-code", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.model:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
        hidden, layers = hidden_size(config), num_hidden_layers(config)
    else:
        hidden, layers = args.hidden_size, args.num_layers
    plan = {"hidden_size": hidden, "num_hidden_layers": layers, "num_target_layers": args.num_draft_layers,
            "target_layer_ids": default_target_layer_ids(layers, args.num_draft_layers) if layers else None,
            "dtype": args.dtype, "bytes_per_token": dump_bytes(1, hidden, args.num_draft_layers, args.dtype)
            - PER_FILE_OVERHEAD}
    per_conv = dump_bytes(round(args.mean_tokens), hidden, args.num_draft_layers, args.dtype)
    plan["bytes_per_conversation_mean"] = per_conv
    plan["total_bytes"] = per_conv * args.num_conversations
    if args.max_seq_len:
        plan["bytes_per_conversation_at_max_seq_len"] = dump_bytes(args.max_seq_len, hidden, args.num_draft_layers,
                                                                   args.dtype)
    print(json.dumps(plan, indent=2))
    print(f"per token {human(plan['bytes_per_token'])}; per conversation ({args.mean_tokens:g} tokens) "
          f"{human(per_conv)}; {args.num_conversations} conversations: {human(plan['total_bytes'])}"
          + (f"; one {args.max_seq_len}-token conversation: {human(plan['bytes_per_conversation_at_max_seq_len'])}"
             if args.max_seq_len else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
