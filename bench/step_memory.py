"""Where a training step's memory goes, counted on the CPU at real dims: the step runs on fake tensors (shapes and
dtypes, no data, no compute) and every tensor the step creates is counted while it is alive.

    python bench/step_memory.py --preset qwen3-8b            # plain and fast (eager) step, bench/train_step.py's dims
    python bench/step_memory.py --preset minimax-m3 --micro-batch 4 --activation-checkpointing [--batch-on-host]

Prints one JSON line per step kind: the peak of live bytes during forward + backward (GiB) on top of what is held
before the step (weights, the frozen head, the batch), the op at the peak, the bytes saved for backward at the end
of forward, split by the module that saved them (and `alive_after_forward`, what is alive then), the step's largest
single tensor, and `at_peak`: what is alive at the peak, each tensor named by where it was made (a parameter or batch
key; else the op, its shape and dtype, the repository source line that made it in forward or the autograd node that
made it in backward, and the draft module it was made in), largest first, with `held_before_gib` +
`peak_above_held_gib` = `total_at_peak_gib`; and the same for each part of the step in `phases`: the draft's
forward, the loss's forward (from the draft's output on), the loss's backward (to the draft output's gradient) and
the draft's backward.
`--step plain|fast` measures one kind only; `--activation-checkpointing` is train.activation_checkpointing.
The frozen head is bf16 as bench/train_step.py holds it on the GPU (not fp32 as on a CPU), so the activations are
bf16 as there. The batch is held on the device, as bench/train_step.py holds it today; `--batch-on-host` leaves it
out of what is held, as the 2026-11-27 bench kept it (pinned on the host): the draft's input features then count
from the moment the step makes them (its copy to the device then, the padding now).

Eager only: the GPU's fast step is also compiled, which fuses the chunk's fp32 logits arithmetic and what a layer
keeps for backward (bench/train_step.py measures that on the GPU). The attention kernel is a stand-in that keeps
what flex_attention keeps for backward (q, k, v, output, log-sum-exp); the optimizer step is left out (AdamW's
states: 8 bytes per parameter, held from the first step on, in `adam_states_gib`; add them to `total_at_peak_gib`
for the GPU's peak after the first step).
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
from dflashkit.model.target import TargetHead  # noqa: E402
from dflashkit.train import loop  # noqa: E402

GIB = 2**30
NAMED_BYTES = 16 * 2**20  # tensors from this size up are named by their source line; smaller ones by op only
REPO = str(Path(__file__).resolve().parents[1])


def _made_where(modules: list[str]) -> str:
    """Where an op runs: the autograd node in backward, else the innermost line of the repository's code; and the
    draft module."""
    node = torch._C._current_autograd_node()
    if node is not None:
        where = f"backward {node.name()}"
    else:
        frame, where = sys._getframe(2), "?"
        while frame is not None:
            name = frame.f_code.co_filename
            if name.startswith(REPO) and "site-packages" not in name:  # a virtualenv inside the checkout: not ours
                where = f"{Path(name).name}:{frame.f_lineno} {frame.f_code.co_name}"
                break
            frame = frame.f_back
    return f"{where} [{modules[-1]}]"


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages that ops created and that are still referenced; the peak, the op that reached it and
    what was alive then. `modules` is the stack of draft modules running (saved_by_module keeps it)."""

    def __init__(self, modules: list[str]):
        super().__init__()
        self.modules = modules
        self.live, self.now, self.peak, self.at, self.largest, self.at_peak = {}, 0, 0, None, (0, None), []
        self.phase, self.phases = None, {}  # the step's part running now; each part's (peak, op, alive then)

    def track(self, t: torch.Tensor, name: str) -> None:
        """Count a tensor made outside the mode (the batch) as alive, under `name`."""
        ref = StorageWeakRef(t.untyped_storage())
        if ref.cdata not in self.live:
            self.live[ref.cdata] = (ref, t.untyped_storage().nbytes(), name)
            self.now += t.untyped_storage().nbytes()

    def name(self, t: torch.Tensor, name: str) -> None:
        """Rename a tensor already counted (a parameter: its name instead of the op that made it)."""
        key = StorageWeakRef(t.untyped_storage()).cdata
        if key in self.live:
            ref, n, _ = self.live[key]
            self.live[key] = (ref, n, name)

    def sweep(self) -> None:
        """Drop the storages freed since the last op."""
        for key, (ref, n, _) in list(self.live.items()):
            if ref.expired():
                self.now -= n
                del self.live[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                ref = StorageWeakRef(t.untyped_storage())
                if ref.cdata not in self.live:
                    n = t.untyped_storage().nbytes()
                    what = f"{func} {tuple(t.shape)} {t.dtype}"
                    if n >= NAMED_BYTES:
                        what += f" @ {_made_where(self.modules)}"
                    self.live[ref.cdata] = (ref, n, what)
                    self.now += n
                    self.largest = max(self.largest, (n, what))
        self.sweep()
        if self.phase is not None and self.now > self.phases.get(self.phase, (0,))[0]:
            self.phases[self.phase] = (self.now, str(func), [(n, what) for _, n, what in self.live.values()])
        if self.now > self.peak:
            self.peak, self.at = self.now, str(func)
            self.at_peak = [(n, what) for _, n, what in self.live.values()]
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


def track_modules(model: torch.nn.Module, stack: list[str]) -> None:
    """Keep `stack` the stack of the draft's module classes running now (forward, a checkpointed layer's
    recompute)."""
    for m in model.modules():
        m.register_forward_pre_hook(lambda mod, _: stack.append(type(mod).__name__))
        m.register_forward_hook(lambda *_: stack.pop() and None)  # a hook that returns something replaces the output


def saved_by_module(stack: list[str], run) -> dict:
    """Bytes saved for backward during `run()`, by the innermost module class that saved them (storages counted
    once)."""
    seen, by = set(), collections.Counter()

    def pack(t):
        ref = StorageWeakRef(t.untyped_storage())
        if ref.cdata not in seen:
            seen.add(ref.cdata)
            by[stack[-1]] += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    return out, {k: round(v / GIB, 2) for k, v in by.most_common()}


def alive(entries: list[tuple[int, str]], top: int = 40) -> list[dict]:
    """The tensors alive at the peak, equal names summed, largest first (the rest in one line)."""
    by = collections.defaultdict(lambda: [0, 0])
    for n, what in entries:
        by[what][0] += n
        by[what][1] += 1
    rows = sorted(by.items(), key=lambda kv: -kv[1][0])
    out = [{"tensor": what, "count": c, "gib": round(n / GIB, 3)} for what, (n, c) in rows[:top]]
    rest = rows[top:]
    if rest:
        out.append({"tensor": "(the rest)", "count": sum(c for _, (_, c) in rest),
                    "gib": round(sum(n for _, (n, _) in rest) / GIB, 3)})
    return out


def measure(args, step: str) -> dict:
    argv = ["--preset", args.preset, "--micro-batch", str(args.micro_batch), "--step", step, "--precision", "bf16",
            "--attention", "sdpa"] + (["--activation-checkpointing"] if args.activation_checkpointing else []) \
        + (["--row-lengths", *map(str, args.row_lengths)] if args.row_lengths else [])
    bench_args = train_step.parse_args(argv)
    modules = ["(outside the draft)"]
    with FakeTensorMode(allow_non_fake_inputs=True) as fake, LiveBytes(modules) as live:
        _, _, trainer, batch, _, _ = train_step.build(bench_args, loop.Dist())
        track_modules(trainer.model, modules)
        for p in trainer.model.parameters():
            live.name(p, "draft weights (fp32)")
        for name, p in trainer.head.named_parameters():
            live.name(p, f"frozen head {name} {tuple(p.shape)} {p.dtype}")
        # The batch as the fake tensors the step will see (a view of one is then counted as the batch itself).
        batch = {k: fake.from_tensor(t) if isinstance(t, torch.Tensor) else t for k, t in batch.items()}
        if not args.batch_on_host:
            for key, t in batch.items():
                if isinstance(t, torch.Tensor):
                    live.track(t, f"batch {key} {tuple(t.shape)} {t.dtype}")
        held = live.now
        live.peak, live.at_peak, live.largest = held, [], (0, None)

        def draft_done(module, inputs, out):  # the draft's output: the loss starts; its gradient: the draft's backward
            live.phase = "loss forward"
            hidden = next(t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor))
            hidden.register_hook(lambda grad: setattr(live, "phase", "draft backward") and None)

        trainer.model.register_forward_hook(draft_done)
        live.phase = "draft forward"
        (loss, _, _), saved = saved_by_module(modules, lambda: trainer._loss(trainer._on_device(batch)))
        live.sweep()
        at_end_of_forward, after_forward = live.now - held, [(n, what) for _, n, what in live.live.values()]
        live.phase = "loss backward"
        loss.backward()
        live.phase = None
        params = sum(p.numel() for p in trainer.model.parameters())
    return {"preset": args.preset, "micro_batch": args.micro_batch, "row_lengths": args.row_lengths, "step": step,
            "activation_checkpointing": args.activation_checkpointing, "batch_on_host": args.batch_on_host,
            "held_before_gib": round(held / GIB, 2), "peak_above_held_gib": round((live.peak - held) / GIB, 2),
            "total_at_peak_gib": round(live.peak / GIB, 2), "peak_at": live.at,
            "live_after_forward_gib": round(at_end_of_forward / GIB, 2), "saved_for_backward_gib": saved,
            "alive_after_forward": alive(after_forward, args.top),
            "largest_tensor": f"{live.largest[0] / GIB:.2f} GiB {live.largest[1]}",
            "adam_states_gib": round(8 * params / GIB, 2), "at_peak": alive(live.at_peak, args.top),
            "phases": {name: {"total_at_peak_gib": round(n / GIB, 2), "peak_above_held_gib": round((n - held) / GIB, 2),
                              "peak_at": at, "at_peak": alive(entries, args.top)}
                       for name, (n, at, entries) in live.phases.items()}}


def patches() -> list[tuple[object, str, object]]:
    """(object, attribute, value): what main sets so that the step runs on fake tensors as it runs on the GPU."""
    real_batch = train_step.synthetic_batch

    def synthetic_batch(**kwargs):  # real data (anchor sampling reads it), made outside the fake mode
        with torch.utils._python_dispatch._disable_current_modes():
            return real_batch(**kwargs)

    def bf16_head(embed, lm_head, norm, eps):  # the GPU's head dtype: bench/train_step.py makes it fp32 on a CPU
        return TargetHead(embed.to(torch.bfloat16), None if lm_head is None else lm_head.to(torch.bfloat16),
                          norm.to(torch.bfloat16), eps)

    return [(train_step, "synthetic_batch", synthetic_batch), (train_step, "TargetHead", bf16_head),
            # all on the CPU already; fake parameters cannot be swapped
            (torch.nn.Module, "to", lambda self, *a, **k: self),
            # The dense mask and SDPA's math kernel would materialize [heads, Q, K] scores the GPU step never has.
            (loop, "training_mask", lambda *a, **k: None),
            (draft_module, "attend", lambda q, k, v, mask: _FlexStandIn.apply(q, k, v))]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(train_step.PRESETS), default="qwen3-8b")
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--row-lengths", type=int, nargs="+", help="bench/train_step.py's: a padded micro-batch")
    p.add_argument("--step", choices=["plain", "fast"], action="append",
                   help="measure this step kind (repeatable; default: plain, then fast)")
    p.add_argument("--activation-checkpointing", action="store_true", help="train.activation_checkpointing")
    p.add_argument("--batch-on-host", action="store_true",
                   help="leave the batch out of what is held (the 2026-11-27 bench: pinned on the host)")
    p.add_argument("--top", type=int, default=40, help="rows of each at_peak (equal names summed)")
    args = p.parse_args(argv)
    for obj, name, value in patches():
        setattr(obj, name, value)
    for step in args.step or ("plain", "fast"):
        print(json.dumps(measure(args, step)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
