"""Time the real training step (forward, loss, backward, AdamW) on synthetic dump-shaped inputs at real dims.

    python bench/train_step.py --preset qwen3-8b [--micro-batch 1] [--steps 10] [--attention flex]

The target head (embed_tokens / lm_head / final norm) is random at the target's vocabulary size; everything else is
the trainer's own code path (dflashkit.train.loop.Trainer.step). Prints step time, tokens/s (dump tokens consumed,
i.e. sequence positions) and peak GPU memory.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from dflashkit.dump.layers import default_target_layer_ids
from dflashkit.model import DFlashConfig, TargetHead
from dflashkit.train.config import DataSpec, DraftSpec, TrainConfig
from dflashkit.train.data import anchor_generator, collate, sample_anchors
from dflashkit.train.distributed import init_distributed
from dflashkit.train.loop import Trainer

PRESETS = {
    "qwen3-8b": {"hidden_size": 4096, "num_target_layers": 36, "num_hidden_layers": 5, "num_attention_heads": 32,
                 "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 12288, "block_size": 16,
                 "anchors": 512, "seq": 3072, "vocab_size": 151936},
    "smollm2": {"hidden_size": 576, "num_target_layers": 30, "num_hidden_layers": 1, "num_attention_heads": 9,
                "num_key_value_heads": 3, "head_dim": 64, "intermediate_size": 1536, "block_size": 16,
                "anchors": 64, "seq": 1024, "vocab_size": 49152},
}


def synthetic_batch(micro: int, seq: int, hidden: int, layers: int, anchors: int, vocab: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    items = []
    for i in range(micro):
        loss_mask = torch.zeros(seq, dtype=torch.uint8)
        loss_mask[seq // 4:] = 1  # a prompt, then the answer
        a, valid = sample_anchors(loss_mask, anchors, anchor_generator(seed, 0, i))
        items.append({"input_ids": torch.randint(0, vocab, (seq,), generator=g),
                      "aux_hidden_states": torch.randn(seq, layers * hidden, generator=g).to(torch.bfloat16),
                      "loss_mask": loss_mask, "anchors": a, "anchor_valid": valid, "length": torch.tensor(seq)})
    return collate(items)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="qwen3-8b")
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--attention", choices=["auto", "flex", "sdpa"], default="auto")
    parser.add_argument("--seq", type=int, help="override the preset's sequence length")
    parser.add_argument("--anchors", type=int, help="override the preset's anchors per sequence")
    args = parser.parse_args()
    p = dict(PRESETS[args.preset])
    preset_seq, preset_anchors = p.pop("seq"), p.pop("anchors")
    seq, anchors = args.seq or preset_seq, args.anchors or preset_anchors
    dcfg = DFlashConfig(**p, target_layer_ids=default_target_layer_ids(p["num_target_layers"], 5),
                        mask_token_id=p["vocab_size"] - 1)
    cfg = TrainConfig(target_model="synthetic", output_dir="unused", attention=args.attention,
                      model=DraftSpec(num_layers=dcfg.num_hidden_layers, block_size=dcfg.block_size,
                                      mask_token_id=dcfg.mask_token_id),
                      data=DataSpec(dump_dirs=["synthetic"], num_anchors=anchors, micro_batch_size=args.micro_batch))
    d = init_distributed()
    h, v = dcfg.hidden_size, dcfg.vocab_size
    dt = torch.bfloat16 if d.device.type == "cuda" else torch.float32
    head = TargetHead(torch.randn(v, h, dtype=dt) * 0.02, torch.randn(v, h, dtype=dt) * 0.02, torch.ones(h, dtype=dt),
                      1e-6)
    trainer = Trainer(cfg, d, "pre_norm", dcfg, head)
    params = sum(p.numel() for p in trainer.model.parameters())
    batch = synthetic_batch(args.micro_batch, seq, h, dcfg.num_fused_layers, anchors, v, seed=0)
    if d.device.type == "cuda":
        batch = {k: t.pin_memory() for k, t in batch.items()}
    times = []
    for step in range(args.warmup + args.steps):
        if d.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        row = trainer.step([batch], lr=1e-4)
        if d.device.type == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    step_time = sorted(times)[len(times) // 2]
    tokens = args.micro_batch * seq
    result = {
        "device": torch.cuda.get_device_name() if d.device.type == "cuda" else "cpu", "preset": args.preset,
        "attention": args.attention, "micro_batch": args.micro_batch, "seq": seq, "anchors": anchors,
        "block_size": dcfg.block_size, "draft_params_m": round(params / 1e6, 1), "step_time_s": round(step_time, 4),
        "tokens_per_s": round(tokens / step_time),
        "block_tokens_per_s": round(anchors * dcfg.block_size * args.micro_batch / step_time),
        "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if d.device.type == "cuda" else None,
        "last_loss": round(row["loss"], 4),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
