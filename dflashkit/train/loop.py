"""DFlash training: `dflashkit train --config recipe.yaml [key.path=value ...] [--resume]`.

The pieces: the target's frozen head (target.py), the draft (draft.py), batches from dumps (data.py) or online from
generate shards and the frozen target (online.py), the block loss (loss.py), the process group and wrapping
(distributed.py), checkpoints (checkpoint.py), metrics (metrics.py), bad-record accounting (BadRecords).
This module wires them into one loop. A step's loss is normalized by the whole global batch's weight, so any split
over ranks and micro-batches computes the same update as one process on the whole batch.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import resource
import time
from pathlib import Path

import torch
import yaml
from torch.profiler import record_function

from dflashkit.config import ConfigError, load_config, to_dict
from dflashkit.model import KINDS, DFlashConfig, TargetHead
from dflashkit.model.masks import block_inputs, training_mask
from dflashkit.model.target import copy_target_layers
from dflashkit.train import checkpoint, data, online
from dflashkit.train.config import OptimSpec, TrainConfig
from dflashkit.train.distributed import Dist, init_distributed, shutdown, wrap
from dflashkit.train.loss import block_loss, normalizer, served_walk, summarize
from dflashkit.train.metrics import MetricsLog
from dflashkit.train.objectives import OBJECTIVES
from dflashkit.train.profile import NEXT_BATCH, STEP, StepProfiler

log = logging.getLogger(__name__)
SOURCES = {"dump": data.DumpSource, "online": online.OnlineSource}  # data.source -> where records and states come from


def target_config(target_model: str) -> dict:
    """The target's config.json: target_model is a local HF model folder (the head's tensors are read from it too)."""
    path = Path(target_model) / "config.json"
    if not path.is_file():
        raise ConfigError(f"target_model {target_model}: no config.json there (a local HF model folder is needed)")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def draft_config(cfg: TrainConfig, meta: dict) -> DFlashConfig:
    target = target_config(cfg.target_model)
    m = cfg.model
    overrides = {k: v for k, v in {"intermediate_size": m.intermediate_size, "num_attention_heads": m.num_attention_heads,
                                       "num_key_value_heads": m.num_key_value_heads, "head_dim": m.head_dim,
                                       "max_position_embeddings": m.max_position_embeddings}.items() if v is not None}
    overrides.update(OBJECTIVES[m.kind].config_overrides(m))
    try:
        dcfg = KINDS[m.kind].config.for_target(target, num_hidden_layers=m.num_layers,
                                               target_layer_ids=meta["target_layer_ids"],
                                               mask_token_id=m.mask_token_id, block_size=m.block_size, **overrides)
    except ValueError as e:  # the draft the recipe asks for does not fit this target (e.g. a mask token past its vocab)
        raise ConfigError(f"model: {e}") from None
    if (dcfg.hidden_size, dcfg.num_target_layers) != (meta["hidden_size"], meta["num_hidden_layers"]):
        raise ConfigError(f"the dump (hidden {meta['hidden_size']}, {meta['num_hidden_layers']} layers) was not made "
                          f"from {cfg.target_model} (hidden {dcfg.hidden_size}, {dcfg.num_target_layers} layers)")
    return dcfg


def init_from_target(draft, cfg: TrainConfig, dcfg: DFlashConfig, resuming: bool) -> None:
    """`model.init_from_target_layers`: draft layer i from target decoder layer ids[i], read by every rank from the
    target's safetensors (so all start equal, as with the seeded init). Checked on resume too; copied only fresh."""
    ids = cfg.model.init_from_target_layers
    bad = [i for i in ids if not 0 <= i < dcfg.num_target_layers]
    if bad:
        raise ConfigError(f"model.init_from_target_layers {ids}: {bad} outside the target's "
                          f"{dcfg.num_target_layers} decoder layers (0..{dcfg.num_target_layers - 1})")
    if ids and not resuming:
        copy_target_layers(draft.layers, cfg.target_model, ids)
        log.info("draft layers initialized from target layers: %s",
                 ", ".join(f"layers.{i} <- target layer {t}" for i, t in enumerate(ids)))


def lr_at(step: int, total: int, o: OptimSpec) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then decay to lr * min_lr_ratio."""
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    progress = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
    shape = {"cosine": 0.5 * (1 + math.cos(math.pi * progress)), "linear": 1 - progress, "constant": 1.0}[o.schedule]
    return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * shape)


def uses_bf16(cfg: TrainConfig, d: Dist) -> bool:
    return cfg.precision == "bf16" or (cfg.precision == "auto" and d.device.type == "cuda")


class Trainer:
    def __init__(self, cfg: TrainConfig, d: Dist, final_state: str, dcfg: DFlashConfig, head: TargetHead,
                 resuming: bool = False):
        self.cfg, self.d, self.dcfg = cfg, d, dcfg
        cuda = d.device.type == "cuda"
        self.bf16 = uses_bf16(cfg, d)
        # The fast step (config.py, `step`): compiled on CUDA (inductor on the CPU costs more than it saves on
        # the small models trained there), the lm_head gradient in forward everywhere.
        self.compiled = cfg.step == "fast" and cuda
        self.grad_in_forward = cfg.step == "fast"
        self.attention = cfg.attention
        self.final_pre_norm = final_state == "pre_norm"
        self.head = head.to(d.device)
        self.objective = OBJECTIVES[cfg.model.kind]
        # Slots per block of the label layout (objectives.py): the loader's targets and the acceptance figures.
        self.label_width = self.objective.label_width(dcfg.block_size)
        if self.head.vocab_size <= dcfg.mask_token_id or self.head.hidden_size != dcfg.hidden_size:
            raise ConfigError(f"target head {list(self.head.lm_head.shape)} does not fit the draft "
                              f"(hidden {dcfg.hidden_size}, mask_token_id {dcfg.mask_token_id})")
        torch.manual_seed(cfg.seed)  # same initial weights on every rank
        with d.device:  # initialized where it trains: a 1-2 B-parameter draft takes tens of seconds on the CPU
            draft = KINDS[cfg.model.kind].model(dcfg)
        with torch.no_grad():  # the draft's output feeds the target's lm_head: start its final norm as the target's
            draft.norm.weight.copy_(self.head.norm_weight.float())
        init_from_target(draft, cfg, dcfg, resuming)  # before wrapping: every rank the same layers
        draft.to(d.device)
        for layer in draft.layers:
            layer.activation_checkpointing = cfg.activation_checkpointing
            if self.compiled:
                layer.compile()  # in place: parameter names (checkpoints, export) stay the same
        mode = cfg.parallel if cfg.parallel != "auto" else (
            "fsdp" if dcfg.hidden_size >= cfg.fsdp_min_hidden_size else "ddp")
        self.model = wrap(draft, d, mode, bf16=self.bf16)
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                           weight_decay=o.weight_decay, fused=cuda)

    def _weight(self, counted: torch.Tensor) -> torch.Tensor:
        """The batch's share of the loss normalizer."""
        return normalizer(counted, self.cfg.loss.kind, self.cfg.loss.decay_gamma)

    def _loss(self, batch: dict):
        """(summed weighted loss, summed acceptance stats, accepted per block) of one micro-batch on the device,
        used by `step` and `evaluate`."""
        with torch.autocast(self.d.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return self._forward(batch)

    def _forward(self, batch: dict):
        dev, B, c = self.d.device, self.dcfg.block_size, self.cfg.loss
        ids, anchors, (aux, context_index) = batch["input_ids"], batch["anchors"], data.context_features(batch)
        labels, counted = batch["labels"], batch["counted"]
        b, t = ids.shape
        block_ids, block_pos = block_inputs(ids, anchors, B, self.dcfg.mask_token_id)
        mask = training_mask(anchors, t, B, self.attention)  # built once, shared by every layer
        inputs = (aux, self.head.embed_tokens(block_ids), torch.arange(t, device=dev).expand(b, t), block_pos, mask)
        hidden, extra = self.objective.forward(self.model, inputs, ids, anchors, B, c, context_index)
        teacher = None
        if c.kd_weight > 0:
            # The target's distribution over x[a+k] comes from its final state at a+k-1.
            idx = (anchors.unsqueeze(-1) + torch.arange(labels.shape[-1], device=dev) - 1).clamp(0, t - 1).flatten(1)
            final = data.padded_features(batch, "hidden_states")
            teacher = torch.gather(final, 1, idx.unsqueeze(-1).expand(-1, -1, final.shape[-1])).view(*labels.shape, -1)
            teacher = self.head.final_norm(teacher) if self.final_pre_norm else teacher
            teacher = teacher.to(self.head.lm_head.dtype)
        return block_loss(hidden, self.head.lm_head, labels, counted, kind=c.kind, gamma=c.decay_gamma,
                          alpha=c.dpace_alpha, kd_weight=c.kd_weight, teacher=teacher, chunk_rows=c.vocab_chunk_rows,
                          rows=batch["rows"], compiled=self.compiled, grad_in_forward=self.grad_in_forward, **extra)

    def _sync_grads(self, sync: bool):
        if hasattr(self.model, "no_sync"):  # DDP: all-reduce only on the step's last micro-batch
            return contextlib.nullcontext() if sync else self.model.no_sync()
        if hasattr(self.model, "set_requires_gradient_sync"):  # FSDP2
            self.model.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()

    def _on_device(self, batch: dict) -> dict:
        # Batches come pinned from the loader (or already copied by data.DevicePrefetcher): no copy waits. fp8
        # states cross as fp8 (half the bytes) and become bf16 here.
        return data.dequantized(data.to_device(batch, self.d.device))

    def step(self, batches: list[dict], lr: float) -> dict:
        """One optimizer step over the micro-batches. Nothing in it waits for the GPU: the result stays on the
        device as tensors (`read` turns it into numbers, the one host sync, when a row is logged)."""
        d = self.d
        batches = [self._on_device(b) for b in batches]
        total_weight = d.all_reduce_sum(sum(self._weight(b["counted"]) for b in batches).float()).clamp(min=1e-6)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_sum, stats = torch.zeros((), device=d.device), 0
        for i, batch in enumerate(batches):
            with self._sync_grads(i == len(batches) - 1):
                loss, batch_stats, _ = self._loss(batch)
                # DDP and FSDP average gradients over ranks; undo that, the normalizer is already global.
                (loss * d.world_size / total_weight).backward()
            loss_sum += loss.detach()
            stats = stats + batch_stats
        clip = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        reduced = d.all_reduce_sum(torch.cat([loss_sum.view(1), stats]))
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        return {"loss": reduced[0] / total_weight, "grad_norm": grad_norm.float(), "stats": reduced[1:]}

    def read(self, result: dict) -> dict:
        """`step`'s result as numbers: one copy to the host."""
        host = torch.cat([result["loss"].view(1), result["grad_norm"].view(1), result["stats"]]).cpu()
        return {"loss": host[0].item(), "grad_norm": host[1].item(), **summarize(host[2:], self.label_width)}

    @torch.no_grad()
    def evaluate(self, batches: list[dict]) -> dict:
        """The step's loss and acceptance figures on held-out batches: no gradient, no update; summed over ranks.
        With every anchor of a stretch in the batches (`DumpDataset(every_anchor=True)`), `tau` is the served one."""
        d = self.d
        sums, stats = torch.zeros(4, device=d.device), 0  # weighted loss sum, its normalizer, served steps, tokens
        for batch in batches:
            on_device = self._on_device(batch)
            loss, batch_stats, accepted = self._loss(on_device)
            steps, tokens = served_walk(accepted.cpu(), batch["anchors"], batch["anchor_valid"])
            walk = torch.tensor([steps, tokens], dtype=torch.float32)
            sums += torch.cat([torch.stack([loss.float(), self._weight(on_device["counted"]).float()]),
                               walk.to(d.device)])
            stats = stats + batch_stats
        reduced = d.all_reduce_sum(torch.cat([sums, stats]))
        return {"loss": (reduced[0] / reduced[1].clamp(min=1e-6)).item(),
                "tau": (reduced[3] / reduced[2].clamp(min=1)).item(),
                **summarize(reduced[4:].cpu(), self.label_width)}


class BadRecords:
    """Records that could not be read, the same set on every rank: each is logged once, by the rank that read it,
    counted in metrics (`bad_records`), kept in checkpoints (a resumed run knows them) and limited by
    data.max_bad_records."""

    def __init__(self, dataset: data.AnchoredDataset, limit: int):
        self.dataset, self.limit = dataset, limit
        self.seen = torch.zeros(len(dataset), dtype=torch.bool)

    def local(self, batches: list[dict], micro: list[list[tuple[int, int]]]) -> list[int]:
        """This rank's bad records in the step's micro-batches (`micro`: their (index, epoch) lists), logged."""
        found = []
        for batch, keys in zip(batches, micro):
            for (index, _), cid, why in zip(keys, batch["conversation_ids"], batch["bad"]):
                if why and not self.seen[index]:
                    log.error("skipped bad record %s: %s", cid, why)
                if why:
                    found.append(index)
        return found

    def merge(self, d: Dist, found: list[int]) -> None:
        """Called by every rank when some rank found one (a collective)."""
        marks = torch.zeros(len(self.seen), device=d.device)
        marks[torch.tensor(found, dtype=torch.long, device=d.device)] = 1
        self.seen |= d.all_reduce_sum(marks).cpu() > 0

    @property
    def count(self) -> int:
        return int(self.seen.sum())

    def ids(self) -> list[str]:
        return [self.dataset.record_id(i) for i in self.seen.nonzero().flatten().tolist()]

    def check_limit(self) -> None:
        if 0 <= self.limit < self.count:
            raise SystemExit(f"stopping: {self.count} bad records, more than data.max_bad_records={self.limit} "
                             f"(the first: {', '.join(self.ids()[:5])}; each has an error line above)")


def logged_bad(batches, logged: set[str]):
    """The held-out batches, each bad record among them logged once per run (it scores nothing)."""
    for batch in batches:
        for cid, why in zip(batch["conversation_ids"], batch["bad"]):
            if why and cid not in logged:
                logged.add(cid)
                log.error("held-out: skipped bad record %s: %s", cid, why)
        yield batch


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


def train(cfg: TrainConfig, resume: bool) -> int:
    d = init_distributed()
    try:
        return _train(cfg, resume, d)
    finally:
        shutdown(d)


def _train(cfg: TrainConfig, resume: bool, d: Dist) -> int:
    out = Path(cfg.output_dir)
    ckpt_root = out / "checkpoints"
    latest = checkpoint.latest_checkpoint(ckpt_root)
    if latest is not None and not resume:
        raise SystemExit(f"{ckpt_root} holds checkpoints; pass --resume to continue, or choose another output_dir")
    target_config(cfg.target_model)  # a wrong path is named here, before a source loads the target from it
    source = SOURCES[cfg.data.source](cfg, d.device, torch.bfloat16 if uses_bf16(cfg, d) else torch.float32)
    meta = source.meta
    paths, heldout_paths = ((source.records, source.heldout) if source.heldout is not None else
                            data.split_heldout(source.records, cfg.data.heldout_records))
    dcfg = draft_config(cfg, meta)
    o = cfg.optim
    grouped = cfg.data.group_by_length
    plan = data.BatchPlan(len(paths), d.world_size, cfg.data.micro_batch_size, o.grad_accum, cfg.seed, grouped,
                          source.sizes(paths) if grouped else None)
    spe = plan.steps_per_epoch  # fewer records than one global batch are refused here, before anything is written
    total = o.max_steps or o.epochs * spe
    if d.is_main:
        log.info("resolved configuration:\n%s", yaml.safe_dump(to_dict(cfg), sort_keys=False).rstrip())
        log.info("draft: %s", json.dumps(dcfg.to_dict()))
        log.info("data: %d records from %s (%d held out); target layers %s, final state %s", len(paths),
                 source.describe(), len(heldout_paths), meta["target_layer_ids"], meta["final_state"])
        out.mkdir(parents=True, exist_ok=True)
    # The frozen target head in bf16 on GPU (the vocabulary matrices are the biggest tensors we hold).
    head = source.head()
    trainer = Trainer(cfg, d, meta["final_state"], dcfg, head, resuming=resume and latest is not None)
    position = {"num_records": plan.num_records, "global_batch": plan.global_batch, "seed": cfg.seed}
    if cfg.data.source != "dump":
        position["source"] = cfg.data.source
    if grouped:  # a different grouping is a different data order: resuming checks it as it checks the seed
        position["group_by_length"] = grouped
    dataset = source.dataset(paths, cfg.data.num_anchors)
    bad = BadRecords(dataset, cfg.data.max_bad_records)
    step = 0
    if resume and latest is not None:
        state = checkpoint.load_checkpoint(latest, trainer.model, trainer.optimizer, d)
        if state["data_position"] != position:
            raise SystemExit(f"{latest}: saved with data position {state['data_position']}, now {position}; the "
                             "data order would differ (same dumps, global batch and seed are needed to resume)")
        step = state["step"]
        bad.seen[state.get("bad_records", [])] = True
        log.info("resumed from %s at step %d", latest, step)
    heldout, heldout_micro, heldout_bad = None, [], set()
    if heldout_paths:
        heldout = source.dataset(heldout_paths, cfg.data.heldout_anchors, every_anchor=True)
        heldout_micro = data.heldout_micro_batches(len(heldout_paths), d.world_size, d.rank,
                                                   cfg.data.micro_batch_size)
    metrics = MetricsLog(out, cfg.tensorboard) if d.is_main else None
    if d.is_main:
        log.info("%d steps (%d per epoch, global batch %d)", total, spe, plan.global_batch)
    cuda = d.device.type == "cuda"
    # One loader for the rest of the run (its workers start once, not at every epoch), then copied ahead to the GPU.
    micro = [m for epoch in range(step // spe, -(-total // spe))
             for m in plan.micro_batches(epoch, max(step - epoch * spe, 0), d.rank)][: (total - step) * o.grad_accum]
    # The loader computes the block targets in the objective's label layout (width B, or B + 1 for DSpark).
    # Online, the target adds each micro-batch's hidden states before the copy (source.batches).
    batches = data.DevicePrefetcher(source.batches(data.loader(dataset, micro, cfg.data.num_workers, cuda,
                                                               trainer.label_width)), d.device)
    fetched, pending_bad = 0, []  # micro-batches taken (micro[fetched] is the next); bad records not yet merged
    # Logged figures cover the interval since the previous logged step (checkpoints and held-out scoring left out):
    # the host reads the GPU only then, and tokens/s over an interval does not swing with one batch's lengths.
    interval_start, interval_steps, interval_tokens = time.perf_counter(), 0, 0
    profiler = StepProfiler(cfg.profile, out / "profile", d.rank, d.device)
    try:
        while step < total:
            epoch = step // spe
            profiler.before(step + 1)
            step_batches = []
            for _ in range(o.grad_accum):
                with record_function(NEXT_BATCH):
                    batch, tokens = next(batches)
                step_batches.append(batch)
                interval_tokens += tokens
            pending_bad += bad.local(step_batches, micro[fetched: fetched + o.grad_accum])
            fetched += o.grad_accum
            with record_function(STEP):
                result = trainer.step(step_batches, lr_at(step, total, o))
            step += 1
            profiler.after(step)
            interval_steps += 1
            logged, checkpointed = step % cfg.log_every == 0 or step == total, step % cfg.checkpoint_every == 0
            if logged or checkpointed or step == total:
                # Bad records are merged over ranks only here (a host sync), so the step itself never waits.
                any_bad = d.all_reduce_sum(torch.tensor(float(len(pending_bad)), device=d.device)).item()
                if any_bad:
                    bad.merge(d, pending_bad)
                pending_bad = []
            if logged:
                row = trainer.read(result)
                if not math.isfinite(row["loss"]):
                    log.error("step %d: loss %s; this rank's records in it: %s", step, row["loss"],
                              [cid for b in step_batches for cid in b["conversation_ids"]])
                tokens = d.all_reduce_sum(torch.tensor(float(interval_tokens), device=d.device)).item()
                dt = time.perf_counter() - interval_start
                row = {"step": step, "epoch": epoch, **row, "lr": lr_at(step - 1, total, o), "tokens": tokens,
                       "tokens_per_s": tokens / dt, "step_time_s": dt / interval_steps,
                       "peak_mem_gb": peak_memory_gb(d.device), "bad_records": bad.count}
                if metrics is not None:
                    metrics.write(row)
                if cuda:
                    torch.cuda.reset_peak_memory_stats(d.device)
                interval_start, interval_steps, interval_tokens = time.perf_counter(), 0, 0
            bad.check_limit()  # before the checkpoint: a resumed run stops here again, not later
            if checkpointed or step == total:
                paused = time.perf_counter()
                trainer_state = {"step": step, "data_position": position, "config": to_dict(cfg),
                                 "bad_records": bad.seen.nonzero().flatten().tolist()}
                checkpoint.save_checkpoint(ckpt_root, step, trainer.model, trainer.optimizer, d, trainer_state,
                                           dcfg.to_json_string(), cfg.keep_checkpoints)
                if heldout_micro:
                    scored = trainer.evaluate(list(logged_bad(source.batches(data.loader(
                        heldout, heldout_micro, cfg.data.num_workers, cuda, trainer.label_width)), heldout_bad)))
                    if metrics is not None:
                        metrics.write_heldout({"step": step, "epoch": epoch, **scored})
                interval_start += time.perf_counter() - paused
    finally:
        profiler.close()
        if metrics is not None:
            metrics.close()
    if d.is_main:
        log.info("done: %d steps; %d bad records skipped%s", step, bad.count,
                 f" ({', '.join(bad.ids()[:20])}{', ...' if bad.count > 20 else ''})" if bad.count else "")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dflashkit train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="recipe YAML (configs/train/*.yaml)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from OUTPUT/checkpoints/latest.json when it exists (else start fresh)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=3e-4 data.num_anchors=256")
    args = parser.parse_args(argv)
    d_rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if d_rank == 0 else logging.WARNING,
                        format=f"%(asctime)s %(levelname)s [rank {d_rank}] %(name)s: %(message)s")
    cfg = load_config(TrainConfig, args.config, args.overrides)
    return train(cfg, args.resume)
