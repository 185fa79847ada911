"""Batches from hidden-state dumps, with anchors, in an order that is a pure function of (seed, step).

- The dumps are read through `dflashkit.dump` (its reader validates every record against meta.json). All dump dirs
  must agree on the target layer ids, their convention, the final-state norm flag, hidden size and dtype: mixing them
  would train on inconsistent features, so a mismatch is refused before training starts.
- Order: epoch e shuffles the records with seed + e; optimizer step s of that epoch takes the next G = world x
  micro_batch x grad_accum records; rank r's micro-batch i of the step is slice (i x world + r). So the global batch
  of a step does not depend on how it is split over ranks and micro-batches, and resuming at step s needs only s.
- Anchors: `num_anchors` per sequence, drawn without replacement from the loss-mask positions (target-generated
  tokens: at inference the anchor is always a token the target produced) that leave at least one token to predict;
  redrawn every epoch from a generator seeded by (seed, epoch, record), so a resumed run draws the same anchors.
- Bad records: a record that cannot be read (a torn or foreign .pt; online: a template error, over-length, an
  all-zero mask) becomes a placeholder that counts nothing (loss mask 0, no real anchor) and names itself in
  `bad`, so the step goes on with the same shapes and collectives on every rank; the loop logs, counts and limits them.
- Every batch carries its records' `conversation_ids`, so whatever goes wrong in a step is reported by id.
"""
from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from dflashkit.config import ConfigError
from dflashkit.dump import DumpFormatError, list_dump_records, load_dump_record, read_meta
from dflashkit.dump.format import FP8, SCALE_KEYS, compute_dtype, dequantize_fp8
from dflashkit.model import TargetHead
from dflashkit.model.layers import CONVENTION
from dflashkit.model.masks import block_labels
from dflashkit.shards import UnusableInput

log = logging.getLogger(__name__)

# Meta fields every dump dir of one training run must share.
COMPATIBLE_META_KEYS = ("target_layer_ids", "layer_id_convention", "final_state", "hidden_size", "dtype",
                        "num_hidden_layers")


def read_dump_dirs(dump_dirs: list[str]) -> tuple[dict, list[Path]]:
    """The shared meta and every record path; refuses dump dirs that disagree."""
    meta, paths = None, []
    for directory in dump_dirs:
        this = read_meta(directory)
        if this["layer_id_convention"] != CONVENTION:
            raise ConfigError(f"dump dir {directory}: layer ids follow {this['layer_id_convention']!r}, the trainer "
                              f"expects {CONVENTION!r}")
        if meta is None:
            meta = this
        else:
            diff = {k: (meta[k], this[k]) for k in COMPATIBLE_META_KEYS if meta[k] != this[k]}
            if diff:
                raise ConfigError(f"dump dir {directory} does not match {dump_dirs[0]}: {diff}")
        found = list_dump_records(directory)
        if not found:
            raise UnusableInput(f"dump dir {directory} holds no records")
        paths += found
    return meta, paths


def split_heldout(paths: list[Path], count: int) -> tuple[list[Path], list[Path]]:
    """(training records, held-out records). The held-out ones come from a permutation with a fixed seed, so runs
    with different seeds are scored on the same text; both lists keep the dump order."""
    if count == 0:
        return paths, []
    if count >= len(paths):
        raise ConfigError(f"data.heldout_records={count} leaves none of the {len(paths)} records for training")
    chosen = set(torch.randperm(len(paths), generator=torch.Generator().manual_seed(0))[:count].tolist())
    return ([p for i, p in enumerate(paths) if i not in chosen], [p for i, p in enumerate(paths) if i in chosen])


def heldout_micro_batches(num_records: int, world_size: int, rank: int, micro_batch_size: int):
    """Rank `rank`'s share of the held-out records as micro-batches of (index, epoch 0: fixed anchors). Every rank
    gets the same number (FSDP2's forward is collective), so the last num_records % world_size are not scored."""
    per_rank = num_records // world_size
    if per_rank == 0:
        raise ConfigError(f"data.heldout_records={num_records} is fewer than one record per rank ({world_size})")
    mine = range(rank * per_rank, (rank + 1) * per_rank)
    return [[(i, 0) for i in mine[s: s + micro_batch_size]] for s in range(0, per_rank, micro_batch_size)]


def anchor_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    digest = hashlib.blake2b(f"{seed}/{epoch}/{index}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


def _eligible_anchors(loss_mask: torch.Tensor) -> torch.Tensor:
    """Loss-mask positions t <= T-2 (the last position has nothing after it to predict), in order."""
    return torch.nonzero(loss_mask[:-1].bool(), as_tuple=False).flatten()


def _padded(chosen: torch.Tensor, num_anchors: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`chosen` padded to [num_anchors] anchor positions, and which are real [num_anchors]."""
    anchors = torch.zeros(num_anchors, dtype=torch.long)
    anchors[: chosen.numel()] = chosen
    return anchors, torch.arange(num_anchors) < chosen.numel()


def sample_anchors(loss_mask: torch.Tensor, num_anchors: int, generator: torch.Generator):
    """Up to `num_anchors` sorted anchor positions [N] among loss-mask positions t <= T-2, and which are real [N]."""
    eligible = _eligible_anchors(loss_mask)
    chosen = eligible[torch.randperm(eligible.numel(), generator=generator)[:num_anchors]].sort().values
    return _padded(chosen, num_anchors)


def first_anchors(loss_mask: torch.Tensor, num_anchors: int):
    """The first `num_anchors` eligible positions in order (and which are real): every anchor of the answers'
    beginnings, so a pass over them can follow the steps served decoding takes (`loss.served_walk`)."""
    return _padded(_eligible_anchors(loss_mask)[:num_anchors], num_anchors)


class BadRecordError(ValueError):
    """A record a data source cannot turn into a training item (the message says which and why)."""


class AnchoredDataset(torch.utils.data.Dataset):
    """Items are addressed by (record index, epoch): the epoch seeds the anchors. `every_anchor`: the first
    `num_anchors` eligible positions instead of a random draw (the held-out score). Subclasses read one record
    (`read`: its tensors, cut to max_seq_len) and name it (`record_id`)."""

    def __init__(self, max_seq_len: int, num_anchors: int, seed: int, every_anchor: bool):
        self.max_seq_len, self.num_anchors, self.seed = max_seq_len, num_anchors, seed
        self.every_anchor = every_anchor

    def read(self, index: int) -> dict:
        raise NotImplementedError

    def record_id(self, index: int) -> str:
        raise NotImplementedError

    def placeholder(self) -> dict:
        """A bad record's tensors: two tokens, nothing counted."""
        return {"input_ids": torch.zeros(2, dtype=torch.long), "loss_mask": torch.zeros(2, dtype=torch.uint8)}

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, epoch = key
        try:
            item, bad = self.read(index), ""
        except (DumpFormatError, OSError, BadRecordError) as e:
            item, bad = self.placeholder(), str(e)
        loss_mask = item["loss_mask"].to(torch.uint8)
        anchors, valid = (first_anchors(loss_mask, self.num_anchors) if self.every_anchor else
                          sample_anchors(loss_mask, self.num_anchors, anchor_generator(self.seed, epoch, index)))
        if bad:
            valid[:] = False
        return {**item, "loss_mask": loss_mask, "anchors": anchors, "anchor_valid": valid,
                "length": torch.tensor(0 if bad else item["input_ids"].shape[0]),
                "conversation_id": self.record_id(index), "bad": bad}


class DumpDataset(AnchoredDataset):
    def __init__(self, paths: list[Path], meta: dict, max_seq_len: int, num_anchors: int, seed: int,
                 with_final: bool, every_anchor: bool = False):
        super().__init__(max_seq_len, num_anchors, seed, every_anchor)
        self.paths, self.meta = paths, meta
        self.with_final = with_final  # the final state is read only for KD

    def __len__(self) -> int:
        return len(self.paths)

    def record_id(self, index: int) -> str:
        return self.paths[index].stem

    def read(self, index: int) -> dict:
        # fp8 states stay fp8 with their scales until the step's device dequantizes them (`dequantized`): on the
        # host, converting fp8 is slow enough to starve the step (3.2x fewer tokens/s with 3 workers on an H200).
        rec = load_dump_record(self.paths[index], self.meta, dequantize=False)
        t = min(rec["input_ids"].shape[0], self.max_seq_len)
        keys = ["input_ids", "loss_mask", "aux_hidden_states"] + (["hidden_states"] if self.with_final else [])
        return {key: rec[key][:t] for key in keys + [SCALE_KEYS[k] for k in keys if SCALE_KEYS.get(k) in rec]}

    def placeholder(self) -> dict:
        h, n, fp8 = self.meta["hidden_size"], len(self.meta["target_layer_ids"]), self.meta["dtype"] == FP8
        dtype = torch.float8_e4m3fn if fp8 else compute_dtype(self.meta["dtype"])
        widths = {"aux_hidden_states": (n * h, n)} | ({"hidden_states": (h, 1)} if self.with_final else {})
        item = super().placeholder()
        for key, (width, layers) in widths.items():
            item[key] = torch.zeros(2, width, dtype=dtype)
            if fp8:
                item[SCALE_KEYS[key]] = torch.ones(2, layers)
        return item


class DumpSource:
    """data.source=dump: records are the dump dirs' `.pt` files; the hidden states come with them."""

    def __init__(self, cfg, device: torch.device, dtype: torch.dtype):
        self.cfg, self.dtype = cfg, dtype
        self.meta, self.records = read_dump_dirs(cfg.data.dump_dirs)
        self.heldout = None  # the held-out records are drawn from these (data.heldout_records)
        if cfg.loss.kd_weight > 0 and self.meta["final_state"] == "none":
            raise ConfigError(f"loss.kd_weight > 0 needs the final state, and {cfg.data.dump_dirs} were dumped "
                              "with --no-final-state")

    def describe(self) -> str:
        return f"dump dirs {self.cfg.data.dump_dirs}"

    @staticmethod
    def sizes(records: list[Path]) -> list[int]:
        """Each record's bytes (in proportion to its tokens): its length, for data.group_by_length, unread."""
        return [p.stat().st_size for p in records]

    def dataset(self, records: list, num_anchors: int, every_anchor: bool = False) -> DumpDataset:
        c = self.cfg
        return DumpDataset(records, self.meta, c.data.max_seq_len, num_anchors, c.seed,
                           with_final=c.loss.kd_weight > 0, every_anchor=every_anchor)

    def head(self) -> TargetHead:
        return TargetHead.from_pretrained(self.cfg.target_model, dtype=self.dtype)

    def batches(self, loader) -> Iterator[dict]:
        return iter(loader)


def padded_length(t: int) -> int:
    """Sequence lengths are padded to a power of two (at least 128): compiled kernels (flex_attention) are
    specialized to the shape, so a handful of shapes compile once instead of every length compiling anew."""
    return max(128, 1 << (t - 1).bit_length())


# The wide per-position features (the fused target layers, the final state): they travel unpadded, `[sum of
# lengths, width]`, and are padded on the GPU (`padded_features`; the fused layers only after the draft's fc narrowed
# them: `context_features`). Padded on the host, a micro-batch of 32 ShareGPT
# answers at SmolLM2's dims was 454 MB of which 17% real; each worker wrote it, then shared memory and the pinning
# thread copied it again, and the copy to the GPU moved it once more (bench/host_step.py).
PACKED = ("aux_hidden_states", "hidden_states", *SCALE_KEYS.values())  # fp8 dumps: the states' scales, row for row
LIST_KEYS = {"conversation_id": "conversation_ids", "bad": "bad"}  # item key -> the batch's list of them


def collate(items: list[dict], block_size: int) -> dict:
    """Right-pad the token-level tensors to `padded_length` of the longest sequence, pack the wide features
    (`PACKED`, with `token_index`: each real position's place in the padded [b * T] layout), and add the block
    targets. Padding is invisible: every anchor lies before its sequence's end, a block sees context only before its
    anchor, and the loss mask is 0 on padding. The targets (`block_labels`: `labels`, `counted` [b, N, B]; `rows`,
    the flat positions where `counted`, whose number sizes the lm_head's input) are computed here, in the loader's
    workers, so they arrive pinned with the rest: the step copies them without a host sync and never reads them on
    the host. The records' ids and bad-record reasons (datasets' items have them; synthetic benchmark items need
    not) become lists (`conversation_ids`, `bad`)."""
    t = padded_length(max(it["input_ids"].shape[0] for it in items))
    out = {LIST_KEYS[key]: [it[key] for it in items] for key in LIST_KEYS if key in items[0]}
    for key in items[0]:
        if key in LIST_KEYS:
            continue
        if key in ("anchors", "anchor_valid", "length"):
            out[key] = torch.stack([it[key] for it in items])
        elif key in PACKED:
            out[key] = torch.cat([it[key] for it in items])
        else:
            first = items[0][key]
            batch = first.new_zeros((len(items), t, *first.shape[1:]))
            for i, it in enumerate(items):
                batch[i, : it[key].shape[0]] = it[key]
            out[key] = batch
    out["token_index"] = torch.cat([i * t + torch.arange(it["input_ids"].shape[0]) for i, it in enumerate(items)])
    out["labels"], out["counted"] = block_labels(out["input_ids"], out["loss_mask"], out["anchors"],
                                                 out["anchor_valid"], block_size)
    out["rows"] = out["counted"].flatten().nonzero()[:, 0]
    return out


def context_features(batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The fused target layers as the draft takes them (DFlashDraft.forward): packed, [sum of lengths, n*H], with
    `token_index` for the draft to pad after its fc, H wide instead of n*H; or, with no padding, the [b, T, n*H] view
    of `padded_features` and None (the packed rows are the padded layout already)."""
    b, t = batch["input_ids"].shape
    packed = batch["aux_hidden_states"]
    if packed.shape[0] == b * t:
        return padded_features(batch, "aux_hidden_states"), None
    return packed, batch["token_index"]


def padded_features(batch: dict, key: str) -> torch.Tensor:
    """A packed feature of a collated batch as [b, T, width], zeros on padding, on the batch's device. A batch with
    no padding (every row T long: the packed rows are already the [b * T] layout, `token_index` 0..b*T-1) gets a
    view of its own tensor instead of a second copy: at minimax-m3's micro-batch 4 x 8192 the fused layers are
    1.9 GiB, which the step would otherwise hold twice (the batch's, and the copy the draft's fc keeps for backward)."""
    b, t = batch["input_ids"].shape
    packed = batch[key]
    if packed.shape[0] == b * t:  # known on the host: no device sync
        return packed.view(b, t, -1)
    return packed.new_zeros(b * t, packed.shape[-1]).index_copy_(0, batch["token_index"], packed).view(b, t, -1)


@dataclass
class BatchPlan:
    """Which records each (step, rank, micro-batch) reads. With `group_windows` K > 0 and the records' `sizes`
    (DataSpec.group_by_length), batches are of similar lengths."""
    num_records: int
    world_size: int
    micro_batch_size: int
    grad_accum: int
    seed: int
    group_windows: int = 0
    sizes: list[int] | None = None

    @property
    def global_batch(self) -> int:
        return self.world_size * self.micro_batch_size * self.grad_accum

    @property
    def steps_per_epoch(self) -> int:
        steps = self.num_records // self.global_batch
        if steps == 0:
            raise ConfigError(f"{self.num_records} records are fewer than one global batch of {self.global_batch} "
                              "(world x micro_batch_size x grad_accum)")
        return steps

    def order(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(self.num_records, generator=g)
        if not self.group_windows:
            return order
        # Only the records the epoch uses (whole global batches) are grouped: the same ones as ungrouped.
        used, gb = self.steps_per_epoch * self.global_batch, self.global_batch
        sizes = torch.tensor(self.sizes)
        grouped = []
        for start in range(0, used, self.group_windows * gb):
            window = order[start: min(used, start + self.group_windows * gb)]
            window = window[torch.sort(sizes[window], descending=True, stable=True).indices]
            batches = window.view(-1, gb)  # consecutive sizes: every rank's rows of a step alike
            grouped.append(batches[torch.randperm(batches.shape[0], generator=g)].flatten())
        return torch.cat([*grouped, order[used:]])

    def micro_batches(self, epoch: int, first_step: int, rank: int) -> list[list[tuple[int, int]]]:
        """Rank `rank`'s micro-batches from step `first_step` of `epoch` to the epoch's end, grad_accum per step;
        the last incomplete global batch of an epoch is dropped so every rank takes the same number of steps."""
        order = self.order(epoch).tolist()
        out = []
        for step in range(first_step, self.steps_per_epoch):
            base = step * self.global_batch
            for micro in range(self.grad_accum):
                start = base + (micro * self.world_size + rank) * self.micro_batch_size
                out.append([(i, epoch) for i in order[start: start + self.micro_batch_size]])
        return out


def loader(dataset: DumpDataset, micro_batches: list[list[tuple[int, int]]], num_workers: int, pin: bool,
           block_size: int):
    # Workers read and collate ahead (prefetch_factor batches each); pinned batches copy to the GPU asynchronously.
    return torch.utils.data.DataLoader(dataset, batch_sampler=micro_batches,
                                       collate_fn=functools.partial(collate, block_size=block_size),
                                       num_workers=num_workers, pin_memory=pin,
                                       prefetch_factor=4 if num_workers else None)


def to_device(batch: dict, device: torch.device) -> dict:
    """The batch's tensors copied to `device` (asynchronously from pinned memory); its id lists as they are."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def dequantized(batch: dict) -> dict:
    """The batch with fp8 states (and their scales, from an fp8 dump) turned into bfloat16 states, where it is."""
    out = dict(batch)
    for key, scale in SCALE_KEYS.items():
        if scale in out:
            out[key] = dequantize_fp8(out[key], out.pop(scale))
    return out


class DevicePrefetcher:
    """Micro-batches already on the GPU: the next one is copied on a side stream while the current step computes,
    so the step's stream never waits for a host-to-device copy. Yields (batch on `device`, its tokens: the sum of
    its real lengths, read on the host before the copy). Elsewhere (CPU) it yields the batches as they come."""

    def __init__(self, batches, device: torch.device):
        self.batches, self.device = iter(batches), device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.ahead = self._fetch()

    def _fetch(self):
        batch = next(self.batches, None)
        if batch is None:
            return None
        tokens = int(batch["length"].sum())
        if self.stream is not None:
            with torch.cuda.stream(self.stream):
                batch = to_device(batch, self.device)
        return batch, tokens

    def __iter__(self):
        return self

    def __next__(self):
        if self.ahead is None:
            raise StopIteration
        (batch, tokens), self.ahead = self.ahead, None
        if self.stream is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_stream(self.stream)
            for t in (v for v in batch.values() if isinstance(v, torch.Tensor)):
                t.record_stream(current)  # the caching allocator must not reuse it while the step reads it
        self.ahead = self._fetch()
        return batch, tokens
