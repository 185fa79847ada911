"""The dump's on-disk contract (docs/FORMATS.md, "Hidden-state dumps"): one `.pt` per conversation plus `meta.json`.

This module is what the trainer imports to read a dump, so it needs only torch and the standard library. Everything
read is validated: a record that breaks the contract raises `DumpFormatError` naming the file and what is wrong,
instead of silently training on a shifted layer, a wrong width or a degenerate loss mask.
"""
from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import torch

from ..config import UserError
from ..io import atomic_write_bytes, atomic_write_json, read_json

FORMAT_VERSION = "dflashkit.dump/1"
META_NAME = "meta.json"
RECORD_SUFFIX = ".pt"
RECORD_KEYS = ("input_ids", "hidden_states", "aux_hidden_states", "loss_mask", "conversation_id")
MASK_DTYPES = (torch.uint8, torch.bool)
# Static meta fields: every shard of one dump must agree on them, or its records would not be interchangeable.
STATIC_META_KEYS = (
    "format", "model", "dtype", "hidden_size", "num_hidden_layers", "target_layer_ids", "layer_id_convention",
    "final_state", "max_seq_len", "length_policy", "chat_template_sha256",
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class DumpFormatError(UserError):
    """A dump file that breaks the contract; the message names the file."""


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def validate_dump_record(rec: Any, meta: dict | None = None, where: str = "record") -> dict:
    """Check one record against the contract (and against `meta` when given). Returns it unchanged."""
    def fail(msg: str) -> None:
        raise DumpFormatError(f"{where}: {msg}")

    if not isinstance(rec, dict):
        fail(f"expected a dict, got {type(rec).__name__}")
    missing = [k for k in RECORD_KEYS if k not in rec]
    extra = sorted(set(rec) - set(RECORD_KEYS))
    if missing or extra:
        fail(f"keys: missing {missing}, unexpected {extra}")
    ids, final, aux, mask = rec["input_ids"], rec["hidden_states"], rec["aux_hidden_states"], rec["loss_mask"]
    if not isinstance(rec["conversation_id"], str) or not rec["conversation_id"]:
        fail("conversation_id must be a non-empty string")
    for name in RECORD_KEYS[:4]:
        if not isinstance(rec[name], torch.Tensor):
            fail(f"{name} is {type(rec[name]).__name__}, expected a tensor")
    if ids.dtype != torch.int64 or ids.dim() != 1 or ids.numel() < 2:
        fail(f"input_ids must be int64 [T] with T >= 2, got {ids.dtype} {list(ids.shape)}")
    t = ids.shape[0]
    if final.dim() != 2 or final.shape[0] != t or not final.is_floating_point():
        fail(f"hidden_states must be float [T={t}, H], got {final.dtype} {list(final.shape)}")
    h = final.shape[1]
    if aux.dim() != 2 or aux.shape[0] != t or aux.shape[1] % h or aux.shape[1] == 0 or aux.dtype != final.dtype:
        fail(f"aux_hidden_states must be {final.dtype} [T={t}, n*{h}], got {aux.dtype} {list(aux.shape)}")
    if mask.dtype not in MASK_DTYPES or list(mask.shape) != [t]:
        fail(f"loss_mask must be uint8/bool [T={t}], got {mask.dtype} {list(mask.shape)}")
    ones = int(mask.to(torch.int64).sum())
    if mask.dtype == torch.uint8 and bool((mask > 1).any()):
        fail("loss_mask holds values other than 0 and 1")
    if ones == 0 or ones == t:
        fail(f"loss_mask is all {'zeros' if ones == 0 else 'ones'}: no prompt/answer split")
    if meta is not None:
        n = len(meta["target_layer_ids"])
        if h != meta["hidden_size"] or aux.shape[1] != n * h:
            fail(f"width H={h}, aux={aux.shape[1]} disagrees with meta (H={meta['hidden_size']}, {n} target layers)")
        if dtype_name(final.dtype) != meta["dtype"]:
            fail(f"dtype {dtype_name(final.dtype)} disagrees with meta dtype {meta['dtype']}")
        if t > meta["max_seq_len"]:
            fail(f"T={t} exceeds meta max_seq_len {meta['max_seq_len']}")
    return rec


def load_dump_record(path: str | os.PathLike, meta: dict | None = None, mmap: bool = False) -> dict:
    """Load and validate one `<conversation_id>.pt`. Safe on untrusted files (weights_only); `mmap` maps the tensors
    instead of reading them (cheap checks of big files)."""
    try:
        rec = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # a torn or foreign file: say which, whatever torch raised
        raise DumpFormatError(f"{path}: not a loadable dump record ({type(e).__name__}: {e})") from e
    validate_dump_record(rec, meta, where=str(path))
    if Path(path).name != rec["conversation_id"] + RECORD_SUFFIX:
        raise DumpFormatError(f"{path}: file name does not match conversation_id {rec['conversation_id']!r}")
    return rec


def save_dump_record(directory: str | os.PathLike, rec: dict) -> Path:
    """Validate and write `<conversation_id>.pt` atomically: a file under its final name is always complete."""
    validate_dump_record(rec, where=f"record {rec.get('conversation_id')!r}")
    buf = io.BytesIO()
    # torch.save writes a view's whole storage: a slice of a bigger capture buffer would silently bloat the file.
    compact = {k: v.clone() if isinstance(v, torch.Tensor) and v.untyped_storage().nbytes() != v.numel() * v.element_size()
               else v for k, v in ((k, rec[k]) for k in RECORD_KEYS)}
    torch.save(compact, buf)
    path = Path(directory) / (rec["conversation_id"] + RECORD_SUFFIX)
    atomic_write_bytes(path, buf.getvalue())
    return path


def list_dump_records(directory: str | os.PathLike) -> list[Path]:
    """Every complete record of a dump dir, sorted. Temp files (".<name>.*.tmp") never match."""
    return sorted(p for p in Path(directory).glob("*" + RECORD_SUFFIX) if not p.name.startswith("."))


# ---- meta.json and shard markers (their names: dflashkit/shards.py) -----------------------------------------------

def validate_meta(meta: Any, where: str = META_NAME) -> dict:
    def fail(msg: str) -> None:
        raise DumpFormatError(f"{where}: {msg}")

    if not isinstance(meta, dict):
        fail("expected a JSON object")
    missing = [k for k in STATIC_META_KEYS if k not in meta]
    if missing:
        fail(f"missing keys {missing}")
    if meta["format"] != FORMAT_VERSION:
        fail(f"format {meta['format']!r}, this reader understands {FORMAT_VERSION!r}")
    if meta["dtype"] not in DTYPES:
        fail(f"dtype {meta['dtype']!r} not one of {sorted(DTYPES)}")
    if meta["final_state"] not in ("pre_norm", "post_norm"):
        fail(f"final_state {meta['final_state']!r} must be pre_norm or post_norm")
    ids = meta["target_layer_ids"]
    if not (isinstance(ids, list) and ids and all(isinstance(i, int) for i in ids) and ids == sorted(set(ids))):
        fail(f"target_layer_ids {ids!r} must be a non-empty increasing list of ints")
    for key in ("hidden_size", "num_hidden_layers", "max_seq_len"):
        if not isinstance(meta[key], int) or meta[key] < 1:
            fail(f"{key} must be a positive int")
    return meta


def shard_markers(directory: str | os.PathLike) -> list[dict]:
    return [read_json(p) for p in sorted(Path(directory).glob("shard-*.done.json"))]


def sum_counts(markers: list[dict]) -> tuple[dict, dict]:
    counts: dict[str, int] = {}
    tokens: dict[str, int] = {}
    for m in markers:
        for k, v in m["counts"].items():
            counts[k] = counts.get(k, 0) + v
        for k, v in m["tokens"].items():
            tokens[k] = tokens.get(k, 0) + v
    return counts, tokens


def read_meta(directory: str | os.PathLike) -> dict:
    """meta.json of a dump dir, validated; `counts`/`tokens`/`shards_done` re-summed from the shard markers now,
    so they are right even when shards finished concurrently."""
    path = Path(directory) / META_NAME
    try:
        meta = read_json(path)
    except (OSError, json.JSONDecodeError) as e:
        raise DumpFormatError(f"{path}: cannot read ({e})") from e
    validate_meta(meta, str(path))
    markers = shard_markers(directory)
    meta["counts"], meta["tokens"] = sum_counts(markers)
    meta["shards_done"] = sorted(m["shard_id"] for m in markers)
    return meta


def write_meta(directory: str | os.PathLike, static: dict) -> dict:
    """Create meta.json, or check that an existing one describes the same dump, then refresh its counts."""
    path = Path(directory) / META_NAME
    validate_meta(static, "new meta")
    if path.exists():
        old = validate_meta(read_json(path), str(path))
        diff = {k: (old.get(k), static[k]) for k in STATIC_META_KEYS if old.get(k) != static[k]}
        if diff:
            raise DumpFormatError(f"{path} describes a different dump; refusing to mix records. Differences: {diff}")
    markers = shard_markers(directory)
    counts, tokens = sum_counts(markers)
    meta = {**static, "counts": counts, "tokens": tokens, "shards_done": sorted(m["shard_id"] for m in markers)}
    atomic_write_json(path, meta)
    return meta
