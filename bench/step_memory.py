"""Where a training step's memory goes, counted on the CPU at real dims: the step runs on fake tensors (shapes and
dtypes, no data, no compute) and every tensor the step creates is counted while it is alive.

    python bench/step_memory.py --preset qwen3-8b            # plain and fast (eager) step, bench/train_step.py's dims

Prints one JSON line per step kind: the peak of live bytes during forward + backward (GiB) on top of what is held
before the step (weights, the frozen head, the batch), the op at the peak, the bytes saved for backward at the end
of forward, split by the module that saved them, and the largest single tensor. Eager only: the GPU's fast step is
also compiled, which fuses the chunk's fp32 logits arithmetic (bench/train_step.py measures that on the GPU). The
attention kernel is a stand-in that keeps what flex_attention keeps for backward (q, k, v, output, log-sum-exp);
the optimizer step is left out (AdamW's states: 8 bytes per parameter, held from the first step on, in
`adam_states_gib`).
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_step  # noqa: E402  (the presets and the trainer as the step benchmark builds it)

from dflashkit.model import draft as draft_module  # noqa: E402
from dflashkit.train import loop  # noqa: E402

GIB = 2**30


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages that ops created and that are still referenced; the peak and the op that reached it."""

    def __init__(self):
        super().__init__()
        self.live, self.now, self.peak, self.at, self.largest = {}, 0, 0, None, (0, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                ref = StorageWeakRef(t.untyped_storage())
                if ref.cdata not in self.live:
                    n = t.untyped_storage().nbytes()
                    self.live[ref.cdata] = (ref, n)
                    self.now += n
                    self.largest = max(self.largest, (n, f"{func} {tuple(t.shape)} {t.dtype}"))
        for key, (ref, n) in list(self.live.items()):
            if ref.expired():
                self.now -= n
                del self.live[key]
        if self.now > self.peak:
            self.peak, self.at = self.now, str(func)
        return out


class _FlexStandIn(torch.autograd.Function):
    """flex_attention's memory: saves q, k, v, the output and the fp32 log-sum-exp; no scores."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def saved_by_module(model: torch.nn.Module, run) -> dict:
    """Bytes saved for backward during `run()`, by the innermost module class that saved them (storages counted
    once)."""
    stack, seen, by = ["(outside the draft)"], set(), collections.Counter()
    for m in model.modules():
        m.register_forward_pre_hook(lambda mod, _: stack.append(type(mod).__name__))
        m.register_forward_hook(lambda *_: stack.pop() and None)  # a hook that returns something replaces the output

    def pack(t):
        ref = StorageWeakRef(t.untyped_storage())
        if ref.cdata not in seen:
            seen.add(ref.cdata)
            by[stack[-1]] += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    return out, {k: round(v / GIB, 2) for k, v in by.most_common()}


def measure(args, step: str) -> dict:
    argv = ["--preset", args.preset, "--micro-batch", str(args.micro_batch), "--step", step, "--precision", "bf16",
            "--attention", "sdpa"]
    bench_args = train_step.parse_args(argv)
    with FakeTensorMode(allow_non_fake_inputs=True), LiveBytes() as live:
        dcfg, cfg, trainer, batch, _, _ = train_step.build(bench_args, loop.Dist())
        held = live.now
        live.peak = held
        (loss, _, _), saved = saved_by_module(trainer.model, lambda: trainer._loss(trainer._on_device(batch)))
        at_end_of_forward = live.now - held
        loss.backward()
        params = sum(p.numel() for p in trainer.model.parameters())
    return {"preset": args.preset, "micro_batch": args.micro_batch, "step": step, "held_before_gib": round(held / GIB, 2),
            "peak_above_held_gib": round((live.peak - held) / GIB, 2), "peak_at": live.at,
            "live_after_forward_gib": round(at_end_of_forward / GIB, 2), "saved_for_backward_gib": saved,
            "largest_tensor": f"{live.largest[0] / GIB:.2f} GiB {live.largest[1]}",
            "adam_states_gib": round(8 * params / GIB, 2)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(train_step.PRESETS), default="qwen3-8b")
    p.add_argument("--micro-batch", type=int, default=1)
    args = p.parse_args(argv)
    real_batch = train_step.synthetic_batch

    def synthetic_batch(**kwargs):  # real data (anchor sampling reads it), made outside the fake mode
        with torch.utils._python_dispatch._disable_current_modes():
            return real_batch(**kwargs)

    train_step.synthetic_batch = synthetic_batch
    torch.nn.Module.to = lambda self, *a, **k: self  # all on the CPU already; fake parameters cannot be swapped
    # The dense mask and SDPA's math kernel would materialize [heads, Q, K] scores the GPU step never has.
    loop.training_mask = lambda *a, **k: None
    draft_module.attend = lambda q, k, v, mask: _FlexStandIn.apply(q, k, v)
    for step in ("plain", "fast"):
        print(json.dumps(measure(args, step)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
