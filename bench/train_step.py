"""Time the real training step (forward, loss, backward, AdamW) on synthetic dump-shaped inputs at real dims.

    python bench/train_step.py --preset qwen3-8b [--micro-batch 1] [--step plain] [--activation-checkpointing]
    torchrun --nproc-per-node 2 bench/train_step.py --preset minimax-m3 --micro-batch 4 --parallel fsdp

Everything but the target is the trainer's own code path (dflashkit.train.loop.Trainer.step); the target head
(embed_tokens / lm_head / final norm) is random at the target's vocabulary size. Prints one JSON line (rank 0): step
time (median), tokens/s per GPU and in total (dump tokens consumed = sequence positions), model FLOPs
(dflashkit/train/flops.py says what is counted), MFU against --peak-tflops (bf16 dense peak; 989 = H100/H200 SXM) and
against a bf16 matmul measured on the card at start, peak memory (max over ranks), the per-step losses, and the
command. An out-of-memory step prints a row with "oom": true and exits 3. `--profile-dir DIR` then runs
`--profile-steps` more steps under the trainer's profiler (dflashkit/train/profile.py): DIR/rank{R}.txt, the ops by
device time, and a Chrome trace beside it.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
import warnings
from pathlib import Path

import torch

from dflashkit.model import DFlashConfig, TargetHead
from dflashkit.model.layers import default_target_layer_ids
from dflashkit.train.config import DataSpec, DraftSpec, LossSpec, ProfileSpec, TrainConfig
from dflashkit.train.distributed import Dist, init_distributed, shutdown
from dflashkit.train.flops import batch_flops
from dflashkit.train.loop import Trainer, peak_memory_gb
from dflashkit.train.profile import StepProfiler
from dflashkit.train.synthetic import synthetic_batch

PRESETS = {
    # Qwen3-8B's decoder layer (its config.json), the DFlash defaults (5 layers, B 16), the trainer's 512 anchors.
    "qwen3-8b": {"hidden_size": 4096, "num_target_layers": 36, "num_hidden_layers": 5, "num_attention_heads": 32,
                 "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 12288, "block_size": 16,
                 "anchors": 512, "seq": 3072, "vocab_size": 151936},
    # MiniMax-M3. hidden 6144: configs/minimax-m3.yaml (model.hidden_size). seq 8192: the recipe's
    # dump.args.max_seq_len / data.max_seq_len. 5 draft layers, B 16, 512 anchors: trainer defaults. 48 query heads
    # (48 x 128 = 6144, a square q_proj), vocab 200064: issue #7. The repo records nothing else about M3's layers;
    # 4 KV heads, head_dim 128, 60 target layers and a 12288-wide dense MLP (its dense_intermediate_size) are the
    # values public copies of M3's config.json show (whose own attention has 64 query heads: --num-attention-heads 64
    # measures that shape).
    "minimax-m3": {"hidden_size": 6144, "num_target_layers": 60, "num_hidden_layers": 5, "num_attention_heads": 48,
                   "num_key_value_heads": 4, "head_dim": 128, "intermediate_size": 12288, "block_size": 16,
                   "anchors": 512, "seq": 8192, "vocab_size": 200064},
    # SmolLM2-135M (the test model): CPU checks.
    "smollm2": {"hidden_size": 576, "num_target_layers": 30, "num_hidden_layers": 1, "num_attention_heads": 9,
                "num_key_value_heads": 3, "head_dim": 64, "intermediate_size": 1536, "block_size": 16,
                "anchors": 64, "seq": 1024, "vocab_size": 49152},
}


def matmul_tflops(device: torch.device, n: int = 8192, iters: int = 50) -> float:
    """Dense bf16 matmul throughput measured on `device`: the practical ceiling to read MFU against."""
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(5):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        a @ b
    end.record()
    torch.cuda.synchronize(device)
    return 2 * n**3 * iters / (start.elapsed_time(end) / 1e3) / 1e12


def reduce_max(d: Dist, value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=d.device)
    if d.enabled:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return float(t)


def command_line(d: Dist) -> str:
    args = shlex.join(sys.argv[1:])
    if d.enabled:
        return f"torchrun --nproc-per-node {d.world_size} bench/train_step.py {args}"
    return f"python bench/train_step.py {args}"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="qwen3-8b")
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    p.add_argument("--seq", type=int, help="override the preset's sequence length")
    p.add_argument("--row-lengths", type=int, nargs="+",
                   help="rows of these lengths (cycled, each at most the sequence length) instead of every row the "
                        "sequence length: a micro-batch padded as real data pads it")
    p.add_argument("--anchors", type=int, help="override the preset's anchors per sequence")
    p.add_argument("--num-layers", type=int, help="override the preset's draft layers")
    p.add_argument("--num-attention-heads", type=int)
    p.add_argument("--num-key-value-heads", type=int)
    p.add_argument("--intermediate-size", type=int)
    p.add_argument("--vocab-size", type=int)
    p.add_argument("--attention", choices=["auto", "flex", "sdpa"], default="auto")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
    p.add_argument("--parallel", choices=["auto", "ddp", "fsdp"], default="auto", help="with torchrun")
    p.add_argument("--step", choices=["fast", "plain"], default="fast",
                   help="the recipe's `step`: fast (the default: compiled, lm_head gradient in forward) or plain")
    p.add_argument("--activation-checkpointing", action="store_true", help="train.activation_checkpointing")
    p.add_argument("--vocab-chunk-rows", type=int, default=LossSpec.vocab_chunk_rows)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--peak-tflops", type=float, default=989.0,
                   help="bf16 dense peak of one card for MFU (989: H100 SXM and H200)")
    p.add_argument("--profile-dir", type=Path,
                   help="after the timed steps, profile --profile-steps more (dflashkit/train/profile.py): the "
                        "table of ops by device time and a Chrome trace in this folder; not in the timed figures")
    p.add_argument("--profile-steps", type=int, default=2)
    p.add_argument("--sync-debug", action="store_true",
                   help="run one more step under torch.cuda.set_sync_debug_mode('warn') and list where it syncs")
    return p.parse_args(argv)


def build(args, d: Dist):
    p = dict(PRESETS[args.preset])
    seq, anchors = p.pop("seq"), p.pop("anchors")
    seq, anchors = args.seq or seq, args.anchors or anchors
    for key in ("num_attention_heads", "num_key_value_heads", "intermediate_size", "vocab_size"):
        if getattr(args, key) is not None:
            p[key] = getattr(args, key)
    if args.num_layers is not None:
        p["num_hidden_layers"] = args.num_layers
    dcfg = DFlashConfig(**p, target_layer_ids=default_target_layer_ids(p["num_target_layers"], 5),
                        mask_token_id=p["vocab_size"] - 1)
    cfg = TrainConfig(target_model="synthetic", output_dir="unused", attention=args.attention,
                      precision=args.precision, parallel=args.parallel, step=args.step,
                      activation_checkpointing=args.activation_checkpointing,
                      model=DraftSpec(num_layers=dcfg.num_hidden_layers, block_size=dcfg.block_size,
                                      mask_token_id=dcfg.mask_token_id),
                      data=DataSpec(dump_dirs=["synthetic"], num_anchors=anchors, micro_batch_size=args.micro_batch),
                      loss=LossSpec(vocab_chunk_rows=args.vocab_chunk_rows))
    cfg.validate()
    h, v = dcfg.hidden_size, dcfg.vocab_size
    dt = torch.bfloat16 if d.device.type == "cuda" and cfg.precision != "fp32" else torch.float32
    g = torch.Generator(d.device).manual_seed(1234)  # the same frozen head on every rank

    def rand(*shape):
        return torch.randn(*shape, generator=g, device=d.device, dtype=dt) * 0.02

    head = TargetHead(rand(v, h), rand(v, h), torch.ones(h, dtype=dt, device=d.device), 1e-6)
    trainer = Trainer(cfg, d, "pre_norm", dcfg, head)
    # Each rank its own data, as in training.
    if any(not 0 < n <= seq for n in args.row_lengths or []):
        raise SystemExit(f"--row-lengths {args.row_lengths}: each in 1..{seq}")
    batch = synthetic_batch(micro=args.micro_batch, seq=seq, width=dcfg.num_fused_layers * h, anchors=anchors,
                            vocab=v, block_size=dcfg.block_size, seed=d.rank, lengths=args.row_lengths)
    # On the device already, as the trainer's data.DevicePrefetcher hands batches over (copied during the step before).
    batch = {k: t.to(d.device) for k, t in batch.items()}
    return dcfg, cfg, trainer, batch, seq, anchors


def run(args, d: Dist) -> dict:
    cuda = d.device.type == "cuda"
    measured_peak = matmul_tflops(d.device) if cuda else None
    dcfg, cfg, trainer, batch, seq, anchors = build(args, d)
    mode = "single" if not d.enabled else "ddp" if hasattr(trainer.model, "no_sync") else "fsdp2"
    times, losses = [], []
    for step in range(args.warmup + args.steps):
        if step == args.warmup and cuda:
            torch.cuda.reset_peak_memory_stats(d.device)
        if cuda:
            torch.cuda.synchronize(d.device)
        t0 = time.perf_counter()
        row = trainer.read(trainer.step([batch], lr=args.lr))  # reading the loss waits for the GPU
        if cuda:
            torch.cuda.synchronize(d.device)
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
        losses.append(row["loss"])
    peak_alloc = reduce_max(d, torch.cuda.max_memory_allocated(d.device) / 2**30 if cuda else peak_memory_gb(d.device))
    peak_reserved = reduce_max(d, torch.cuda.max_memory_reserved(d.device) / 2**30) if cuda else None
    syncs = None
    if args.sync_debug and cuda:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            trainer.read(trainer.step([batch], lr=args.lr))
            torch.cuda.set_sync_debug_mode("default")
        syncs = sorted({f"{os.path.relpath(w.filename)}:{w.lineno}" for w in caught
                        if "synchroniz" in str(w.message)})
    if args.profile_dir:
        profiler = StepProfiler(ProfileSpec(start=1, steps=args.profile_steps), args.profile_dir, d.rank, d.device)
        for step in range(1, args.profile_steps + 1):
            profiler.before(step)
            trainer.read(trainer.step([batch], lr=args.lr))
            profiler.after(step)
    step_time = reduce_max(d, sorted(times)[len(times) // 2])  # the step ends with the slowest rank
    flops = batch_flops(dcfg, batch)
    total_flops = torch.tensor(flops.total, dtype=torch.float64, device=d.device)
    flops_per_gpu = float(d.all_reduce_sum(total_flops)) / d.world_size
    tokens = int(batch["length"].sum())  # real positions (micro-batch x seq unless --row-lengths)
    achieved = flops_per_gpu / step_time / 1e12
    return {
        "device": torch.cuda.get_device_name(d.device) if cuda else "cpu", "gpus": d.world_size, "mode": mode,
        "preset": args.preset, "hidden": dcfg.hidden_size, "heads": f"{dcfg.num_attention_heads}/{dcfg.num_key_value_heads}",
        "draft_layers": dcfg.num_hidden_layers, "intermediate": dcfg.intermediate_size, "vocab": dcfg.vocab_size,
        "seq": seq, "row_lengths": args.row_lengths, "anchors": anchors, "block_size": dcfg.block_size,
        "micro_batch": args.micro_batch,
        "attention": trainer.attention if trainer.attention != "auto" else ("flex" if cuda else "sdpa"),
        "precision": "bf16-autocast" if trainer.bf16 else "fp32", "step": cfg.step, "compiled": trainer.compiled,
        "activation_checkpointing": cfg.activation_checkpointing, "vocab_chunk_rows": cfg.loss.vocab_chunk_rows,
        "draft_params_m": round(sum(p.numel() for p in trainer.model.parameters()) / 1e6, 1),  # DTensor: global
        "step_time_s": round(step_time, 4),
        "tokens_per_s_per_gpu": round(tokens / step_time), "tokens_per_s_total": round(tokens * d.world_size / step_time),
        "model_tflop_per_gpu_step": round(flops_per_gpu / 1e12, 2),
        "flops_split": {k: round(v / flops.total, 3) for k, v in flops.as_dict().items() if k != "total"},
        "achieved_tflops_per_gpu": round(achieved, 1),
        "peak_tflops": args.peak_tflops, "mfu": round(achieved / args.peak_tflops, 4),
        "measured_peak_tflops": round(measured_peak, 1) if measured_peak else None,
        "mfu_measured_peak": round(achieved / measured_peak, 4) if measured_peak else None,
        "peak_mem_gib": round(peak_alloc, 2), "peak_reserved_gib": round(peak_reserved, 2) if cuda else None,
        "losses": [round(x, 6) for x in losses], "host_syncs": syncs, "command": command_line(d),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    d = init_distributed()
    try:
        row = run(args, d)
    except torch.cuda.OutOfMemoryError as e:
        # One rank's row is enough; torchrun then stops the other ranks.
        print(json.dumps({"preset": args.preset, "micro_batch": args.micro_batch, "gpus": d.world_size, "oom": True,
                          "rank": d.rank, "error": str(e).splitlines()[0][:200], "command": command_line(d)}),
              flush=True)
        return 3
    if d.is_main:
        print(json.dumps(row), flush=True)
    shutdown(d)
    return 0


if __name__ == "__main__":
    sys.exit(main())
