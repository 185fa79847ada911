"""Time SpecForge's DFlash training step on the inputs bench/train_step.py times ours on (same preset, same
synthetic batch), through SpecForge's own public classes: `DFlashDraftModel` (the draft), `OnlineDFlashModel` (its
training forward: anchor sampling, the block mask, the chunked lm_head loss) and `BF16Optimizer` (its AdamW over
fp32 master weights), as its DFlash recipe builds them: the whole model in bf16, flex_attention, 512 anchors,
objective chunks of its default 128 blocks, loss decay gamma 7 (ours: `loss.decay_gamma`).

    PYTHONPATH=SITE:. python bench/peers/specforge_step.py --preset qwen3-8b [--micro-batch 1] [--steps 10]

SITE holds specforge 0.2.0 installed without its dependencies (`pip install --no-deps --target SITE
specforge-0.2.0-py3-none-any.whl`, the wheel carried to the GPU machine): the DFlash training path imports none of
them beyond torch and transformers. Prints one JSON line shaped like
bench/train_step.py's (step time median, tokens/s, peak memory, MFU of the same model FLOP count against a
bf16 matmul measured on the card, losses).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_step  # noqa: E402  (presets and the measured matmul peak, shared with our benchmark)

from dflashkit.model import DFlashConfig  # noqa: E402
from dflashkit.model.layers import default_target_layer_ids  # noqa: E402
from dflashkit.train.data import padded_features  # noqa: E402
from dflashkit.train.flops import batch_flops  # noqa: E402
from dflashkit.train.synthetic import synthetic_batch  # noqa: E402


def build(preset: dict, attention: str, device: torch.device, dtype: torch.dtype):
    """SpecForge's draft and training wrapper at the preset's dims, with a random frozen target head."""
    from specforge.algorithms.common.dflash_family_model import OnlineDFlashModel
    from specforge.modeling.draft.dflash import DFlashDraftModel
    from transformers import Qwen3Config

    p = preset
    layer_ids = default_target_layer_ids(p["num_target_layers"], 5)
    config = Qwen3Config(hidden_size=p["hidden_size"], num_hidden_layers=p["num_hidden_layers"],
                         num_attention_heads=p["num_attention_heads"], num_key_value_heads=p["num_key_value_heads"],
                         head_dim=p["head_dim"], intermediate_size=p["intermediate_size"], vocab_size=p["vocab_size"],
                         rms_norm_eps=1e-6, max_position_embeddings=40960, rope_theta=1e6, tie_word_embeddings=False,
                         layer_types=["full_attention"] * p["num_hidden_layers"])
    config.block_size, config.num_target_layers = p["block_size"], p["num_target_layers"]
    config.dflash_config = {"mask_token_id": p["vocab_size"] - 1, "target_layer_ids": layer_ids}
    config._attn_implementation = attention  # as SpecForge's model provider sets it from training.attention_backend
    draft = DFlashDraftModel(config)
    lm_head = torch.nn.Linear(p["hidden_size"], p["vocab_size"], bias=False)
    embed = torch.nn.Embedding(p["vocab_size"], p["hidden_size"])
    for frozen in (lm_head, embed):
        torch.nn.init.normal_(frozen.weight, std=0.02)
        frozen.requires_grad_(False)
    model = OnlineDFlashModel(draft, lm_head, embed, mask_token_id=p["vocab_size"] - 1, block_size=p["block_size"],
                              attention_backend=attention, num_anchors=p["anchors"], loss_decay_gamma=7.0)
    return model.to(device=device, dtype=dtype), layer_ids


def inputs(batch: dict, device: torch.device, dtype: torch.dtype) -> dict:
    """Our collated batch as OnlineDFlashModel.forward takes it: the fused target layers padded as `hidden_states`,
    the loss mask as floats. It samples its own anchors (as many, from the same loss-mask positions)."""
    return {"input_ids": batch["input_ids"].to(device),
            "hidden_states": padded_features(batch, "aux_hidden_states").to(device, dtype),
            "loss_mask": batch["loss_mask"].to(device, torch.float32)}


def run(args) -> dict:
    from specforge.optimizer import BF16Optimizer

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    measured_peak = train_step.matmul_tflops(device) if cuda else None
    preset = dict(train_step.PRESETS[args.preset])
    preset.update({k: v for k, v in (("seq", args.seq), ("anchors", args.anchors), ("vocab_size", args.vocab_size),
                                     ("num_hidden_layers", args.num_layers)) if v is not None})
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(0)
    model, layer_ids = build(preset, args.attention, device, dtype)
    optimizer = BF16Optimizer(model, lr=args.lr, max_grad_norm=1.0, total_steps=10**6, warmup_ratio=0.0)
    batch = synthetic_batch(micro=args.micro_batch, seq=preset["seq"], width=len(layer_ids) * preset["hidden_size"],
                            anchors=preset["anchors"], vocab=preset["vocab_size"], block_size=preset["block_size"],
                            seed=0)
    feed = inputs(batch, device, dtype)
    times, losses = [], []
    for step in range(args.warmup + args.steps):
        if step == args.warmup and cuda:
            torch.cuda.reset_peak_memory_stats(device)
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        loss, _, _ = model(**feed)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if cuda:
            torch.cuda.synchronize(device)
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    step_time = sorted(times)[len(times) // 2]
    dcfg = DFlashConfig(**{k: preset[k] for k in ("hidden_size", "num_target_layers", "num_hidden_layers",
                                                  "num_attention_heads", "num_key_value_heads", "head_dim",
                                                  "intermediate_size", "block_size", "vocab_size")},
                        target_layer_ids=layer_ids, mask_token_id=preset["vocab_size"] - 1)
    flops = batch_flops(dcfg, batch).total  # the same useful work as ours (their lm_head also sees uncounted rows)
    achieved = flops / step_time / 1e12
    import specforge

    return {"peer": "specforge", "version": getattr(specforge, "__version__", "0.2.0"),
            "device": torch.cuda.get_device_name(device) if cuda else "cpu", "preset": args.preset,
            "micro_batch": args.micro_batch, "seq": preset["seq"], "anchors": preset["anchors"],
            "attention": args.attention, "precision": str(dtype).removeprefix("torch."),
            "draft_params_m": round(sum(p.numel() for p in model.draft_model.parameters()) / 1e6, 1),
            "step_time_s": round(step_time, 4), "tokens_per_s_per_gpu": round(args.micro_batch * preset["seq"] / step_time),
            "achieved_tflops_per_gpu": round(achieved, 1),
            "measured_peak_tflops": round(measured_peak, 1) if measured_peak else None,
            "mfu_measured_peak": round(achieved / measured_peak, 4) if measured_peak else None,
            "peak_mem_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if cuda else None,
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved(device) / 2**30, 2) if cuda else None,
            "losses": [round(x, 6) for x in losses],
            "command": "python bench/peers/specforge_step.py " + " ".join(sys.argv[1:])}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(train_step.PRESETS), default="qwen3-8b")
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--seq", type=int)
    p.add_argument("--anchors", type=int)
    p.add_argument("--vocab-size", type=int)
    p.add_argument("--num-layers", type=int)
    p.add_argument("--attention", choices=["flex_attention", "sdpa"], default="flex_attention")
    p.add_argument("--lr", type=float, default=1e-4)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        row = run(args)
    except torch.cuda.OutOfMemoryError as e:
        print(json.dumps({"peer": "specforge", "preset": args.preset, "micro_batch": args.micro_batch, "oom": True,
                          "error": str(e).splitlines()[0][:200]}), flush=True)
        return 3
    print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
