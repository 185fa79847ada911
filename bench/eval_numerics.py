"""Is our loop's tau a property of the draft, or of the kernels' rounding? Steps per prompt, side by side, with one
change at a time: the reference (fp32, SDPA), the target's attention in the eager kernel, target and draft in
float64; for scale, a block attending causally within itself instead of both ways (what a serving engine that
ignored DFlash's non-causal block would compute); and vLLM 0.32's CPU draft, whose grouped RMSNorm (`ops.rms_norm`
with a [layers, head_dim] weight, in qwen3_dflash's context-K path) norms every layer's context keys with layer 0's
k_norm weight (`vllm-cpu-context-k-norm`). Greedy, one request at a time, as `dflashkit eval`.

    python bench/eval_numerics.py --draft DRAFT --target TARGET --mtbench mtbench.jsonl --per-category 1

Prints one JSON line per variant: tau, steps and steps per prompt. Equal steps under the rounding variants mean a
difference to another engine's tau is not near-tie rounding; `--check-vllm-rms-norm` first prints whether the
installed vLLM's `ops.rms_norm` uses a per-layer weight's rows (on the GPU where there is one; null: no vLLM).
"""
from __future__ import annotations

import argparse
import json

import torch

from dflashkit.eval import spec
from dflashkit.eval.prompts import load_prompts
from dflashkit.eval.run import eos_token_ids
from dflashkit.eval.vllm_metrics import norms_keys_per_layer
from dflashkit.export import load_draft

VARIANTS = ("fp32", "eager-attention", "float64", "causal-block", "vllm-cpu-context-k-norm")


class ContextKeyNormOfLayer0(torch.nn.Module):
    """A layer's k_norm over [context, block] keys ([b, heads, T, d], the block last) with the context's normed by
    layer 0's weight, as vLLM 0.32's CPU draft does."""

    def __init__(self, own: torch.nn.Module, first: torch.nn.Module, block_size: int):
        super().__init__()
        self.own, self.first, self.block_size = own, first, block_size

    def forward(self, k: torch.Tensor) -> torch.Tensor:
        context = k.shape[2] - self.block_size
        return torch.cat([self.first(k[:, :, :context]), self.own(k[:, :, context:])], dim=2)


def causal_block_mask(dense_mask):
    def mask(anchors: torch.Tensor, context_len: int, block_size: int) -> torch.Tensor:
        m = dense_mask(anchors, context_len, block_size)
        m[..., context_len:] &= torch.ones(block_size, block_size, dtype=torch.bool, device=m.device).tril()
        return m
    return mask


def run(variant: str, args, tokenizer, prompts) -> dict:
    from transformers import AutoModelForCausalLM

    dtype = torch.float64 if variant == "float64" else torch.float32
    attention = "eager" if variant == "eager-attention" else "sdpa"
    target = AutoModelForCausalLM.from_pretrained(args.target, dtype=dtype, attn_implementation=attention)
    draft = load_draft(args.draft).to(dtype)
    if variant == "vllm-cpu-context-k-norm":
        first = draft.layers[0].self_attn.k_norm
        for layer in draft.layers[1:]:
            layer.self_attn.k_norm = ContextKeyNormOfLayer0(layer.self_attn.k_norm, first, draft.config.block_size)
    reference = spec.dense_mask
    spec.dense_mask = causal_block_mask(reference) if variant == "causal-block" else reference
    try:
        decoder, eos = spec.SpeculativeDecoder(target, draft), eos_token_ids(target, tokenizer)
        steps = [decoder.generate(p.prompt_ids, args.max_new_tokens, 0.0, eos) for p in prompts]
    finally:
        spec.dense_mask = reference
    stats = spec.acceptance_stats([a for g in steps for a in g.accepted], decoder.num_drafts)
    return {"variant": variant, "tau": round(stats["tau"], 4), "steps": stats["steps"],
            "steps_per_prompt": {p.id: g.steps for p, g in zip(prompts, steps)}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--draft", required=True)
    p.add_argument("--target", required=True)
    p.add_argument("--mtbench", required=True)
    p.add_argument("--per-category", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--check-vllm-rms-norm", action="store_true",
                   help="first print whether the installed vLLM's ops.rms_norm uses a per-layer weight (null: no vLLM)")
    args = p.parse_args(argv)
    if args.check_vllm_rms_norm:
        print(json.dumps({"vllm_rms_norm_uses_per_layer_weights": norms_keys_per_layer()}), flush=True)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.target)
    prompts = load_prompts(args.mtbench, tokenizer, per_category=args.per_category)
    for variant in args.variants:
        print(json.dumps(run(variant, args, tokenizer, prompts)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
