"""The host's share of a training step at the SmolLM2 quality recipe's shapes, measured on the CPU (no GPU needed):
what the data path costs per micro-batch and where it runs, and how many ops (kernel launches, eager) a step
dispatches.

    python bench/host_step.py [--micro-batch 32] [--repeats 5]

Micro-batches are collated from dump-shaped records at SmolLM2-135M's dims (5 target layers x 576, the final state
for KD; lengths log-normal around ShareGPT's, as bench/smollm2_step.py writes them). Prints one JSON line:
- `collate_ms`: collating one micro-batch (a loader worker's job, off the training thread), and
  `wide_padding_ms`: what padding the wide features on the host added to it before (data.PACKED: they travel
  unpadded now and are padded on the GPU);
- `targets_ms`: labels, counted slots and lm_head rows of one micro-batch: the training thread computed them every
  micro-batch before, in the workers now (data.collate), so they arrive pinned with the rest;
- `padding_efficiency`: real tokens / padded positions; `batch_mb` (and `padded_batch_mb`, before) what one
  micro-batch moves from the worker through shared memory and pinning to the GPU, and `copy_ms_at_25gbps` the copy
  to the GPU, now on a side stream during the step before (data.DevicePrefetcher);
- `block_mask`: building one micro-batch's flex BlockMask, ours (its tile tables worked out from the anchors) and
  create_block_mask's (the rule evaluated densely over [rows, Q, KV], which the trainer ran every step before),
  milliseconds on this CPU and ATen ops each;
- `ops_per_step`: ATen ops one step dispatches (counted on fake tensors at these shapes: forward + backward +
  gradient clipping; the optimizer's fused AdamW is a few launches more), plain and fast (eager) step; on the GPU
  the fast step is also compiled, which fuses most of them (the GPU run measures that, not this script);
- `host_reads_per_step`: reads of GPU results by dflashkit code during a step (each waits for the GPU and leaves
  it idle while the host launches the next step): the step before this change made 4 plus 4 pageable copies per
  micro-batch (each a stream sync); now none (tests/unit/test_train_perf.py checks it), one per logged interval.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_step  # noqa: E402

from dflashkit.model import masks  # noqa: E402
from dflashkit.model.masks import block_labels  # noqa: E402
from dflashkit.train import loop  # noqa: E402
from dflashkit.train.data import PACKED, anchor_generator, collate, padded_features, sample_anchors  # noqa: E402

H, LAYERS, BLOCK, ANCHORS, DRAFT_LAYERS = 576, 5, 16, 64, 3  # configs/train/smollm2-quality.yaml's draft


def records(n: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.exp(torch.randn(n, generator=g) * 0.8 + 5.55).clamp(32, 2048).long().tolist()
    out = []
    for i, t in enumerate(lengths):
        loss_mask = (torch.arange(t) >= t // 4).to(torch.uint8)
        a, valid = sample_anchors(loss_mask, ANCHORS, anchor_generator(0, 0, i))
        out.append({"input_ids": torch.randint(0, 49152, (t,), generator=g),
                    "aux_hidden_states": torch.randn(t, LAYERS * H, generator=g).to(torch.bfloat16),
                    "hidden_states": torch.randn(t, H, generator=g).to(torch.bfloat16), "loss_mask": loss_mask,
                    "anchors": a, "anchor_valid": valid, "length": torch.tensor(t)})
    return out


def best_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return round(min(times) * 1e3, 2)


class OpCount(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def ops_per_step(step: str, micro: int, seq: int) -> int:
    args = train_step.parse_args(["--preset", "smollm2", "--num-layers", str(DRAFT_LAYERS), "--seq", str(seq),
                                  "--anchors", str(ANCHORS), "--micro-batch", str(micro), "--step", step,
                                  "--attention", "sdpa"])
    real_batch = train_step.synthetic_batch

    def synthetic_batch(**kwargs):  # real data (anchor sampling reads it), made outside the fake mode
        with torch.utils._python_dispatch._disable_current_modes():
            return real_batch(**kwargs)

    train_step.synthetic_batch = synthetic_batch
    with FakeTensorMode(allow_non_fake_inputs=True):
        _, _, trainer, batch, _, _ = train_step.build(args, loop.Dist())
        trainer.optimizer.step = lambda: None  # AdamW on the CPU reads its step count: not a fake-tensor op
        with OpCount() as count:
            trainer.step([batch], lr=1e-4)
    train_step.synthetic_batch = real_batch
    return count.ops


def block_mask_ms(anchors: torch.Tensor, seq: int, repeats: int) -> dict:
    """The flex BlockMask of one micro-batch: ours (tile tables from the anchors) and create_block_mask's for the
    same rule (evaluated densely over [rows, Q, KV]), with the ATen ops each dispatches."""
    from torch.nn.attention.flex_attention import create_block_mask

    b, n = anchors.shape
    builders = {"tile_tables": lambda: masks.flex_block_mask(anchors, seq, BLOCK),
                "create_block_mask": lambda: create_block_mask(masks.mask_mod(anchors, seq, BLOCK), B=b, H=None,
                                                               Q_LEN=n * BLOCK, KV_LEN=seq + n * BLOCK, device="cpu")}
    out = {}
    for name, build in builders.items():
        with OpCount() as count:
            build()
        out[name] = {"ms": best_ms(build, repeats), "ops": count.ops}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--micro-batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    items = records(args.micro_batch)
    batch = collate(items, BLOCK)
    targets = lambda: block_labels(batch["input_ids"], batch["loss_mask"], batch["anchors"], batch["anchor_valid"],  # noqa: E731
                                   BLOCK)[1].flatten().nonzero()
    real = int(batch["length"].sum())
    nbytes = sum(t.numel() * t.element_size() for t in batch.values())
    padded_nbytes = nbytes + sum((batch["input_ids"].numel() - batch[k].shape[0]) * batch[k][0].numel() *
                                 batch[k].element_size() for k in PACKED if k in batch)
    torch.nn.Module.to = lambda self, *a, **k: self  # fake parameters cannot be swapped in place (all on the CPU)
    seq = batch["input_ids"].shape[1]
    print(json.dumps({
        "micro_batch": args.micro_batch, "padded_seq": seq, "real_tokens": real,
        "collate_ms": best_ms(lambda: collate(items, BLOCK), args.repeats),
        "wide_padding_ms": best_ms(lambda: [padded_features(batch, k) for k in PACKED if k in batch], args.repeats),
        "targets_ms": best_ms(targets, args.repeats),
        "padding_efficiency": round(real / batch["input_ids"].numel(), 3),
        "batch_mb": round(nbytes / 1e6, 1), "padded_batch_mb": round(padded_nbytes / 1e6, 1),
        "copy_ms_at_25gbps": round(nbytes / 25e9 * 1e3, 2),
        "block_mask": block_mask_ms(batch["anchors"], seq, args.repeats),
        "ops_per_step": {step: ops_per_step(step, args.micro_batch, seq) for step in ("plain", "fast")},
        "host_reads_per_step": {"before": "4 reads + 4 pageable copies per micro-batch", "now": 0}}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
