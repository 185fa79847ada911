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
# fp8 records carry one float32 scale per (token, stored layer) beside the states; `hidden_states` (and its scale) is
# absent when meta.final_state is "none" (dumped with --no-final-state: KD off).
SCALE_KEYS = {"aux_hidden_states": "aux_scale", "hidden_states": "hidden_scale"}
MASK_DTYPES = (torch.uint8, torch.bool)
# Static meta fields: every shard of one dump must agree on them, or its records would not be interchangeable.
STATIC_META_KEYS = (
    "format", "model", "dtype", "hidden_size", "num_hidden_layers", "target_layer_ids", "layer_id_convention",
    "final_state", "max_seq_len", "length_policy", "chat_template_sha256",
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # the model runs in these
FP8 = "float8_e4m3fn"
STORAGE_DTYPES = {**DTYPES, FP8: torch.float8_e4m3fn}  # meta.dtype: how the states are stored
FP8_MAX = 448.0  # the largest finite float8_e4m3fn
FINAL_STATES = ("pre_norm", "post_norm", "none")


class DumpFormatError(UserError):
    """A dump file that breaks the contract; the message names the file."""


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def quantize_fp8(x: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, groups*H] -> (float8_e4m3fn [T, groups*H], float32 scale [T, groups]): each token's H values of each
    layer share one scale, amax / 448, so every layer of every token uses fp8's whole range (the residual stream's
    size grows with depth, and varies from token to token)."""
    t = x.shape[0]
    grouped = x.float().view(t, groups, -1)
    scale = grouped.abs().amax(-1).clamp(min=1e-12) / FP8_MAX
    q = (grouped / scale.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.view(t, -1), scale


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    t, groups = scale.shape
    return (q.view(t, groups, -1).float() * scale.unsqueeze(-1)).view(t, -1).to(dtype)


def compute_dtype(name: str) -> torch.dtype:
    """The dtype the model runs in for a dump stored as `name` (fp8 dumps come from a bf16 model)."""
    return torch.bfloat16 if name == FP8 else DTYPES[name]


def to_storage(rec: dict, dtype: str, num_target_layers: int, keep_final: bool) -> dict:
    """A record of model-dtype states as it is stored: cast to `dtype` (fp8: quantized with its scales), the final
    state dropped unless `keep_final`."""
    out = {k: v for k, v in rec.items() if k != "hidden_states" or keep_final}
    groups = {"aux_hidden_states": num_target_layers, "hidden_states": 1}
    for key in [k for k in SCALE_KEYS if k in out]:
        if dtype == FP8:
            out[key], out[SCALE_KEYS[key]] = quantize_fp8(out[key], groups[key])
        else:
            out[key] = out[key].to(STORAGE_DTYPES[dtype])
    return out


def validate_dump_record(rec: Any, meta: dict | None = None, where: str = "record") -> dict:
    """Check one record against the contract (and against `meta` when given). Returns it unchanged."""
    def fail(msg: str) -> None:
        raise DumpFormatError(f"{where}: {msg}")

    if not isinstance(rec, dict):
        fail(f"expected a dict, got {type(rec).__name__}")
    aux = rec.get("aux_hidden_states")
    fp8 = isinstance(aux, torch.Tensor) and aux.dtype == torch.float8_e4m3fn
    with_final = "hidden_states" in rec if meta is None else meta["final_state"] != "none"
    expected = {"input_ids", "aux_hidden_states", "loss_mask", "conversation_id"} | (
        {"hidden_states"} if with_final else set())
    expected |= {SCALE_KEYS[k] for k in expected & set(SCALE_KEYS)} if fp8 else set()
    missing, extra = sorted(expected - set(rec)), sorted(set(rec) - expected)
    if missing or extra:
        fail(f"keys: missing {missing}, unexpected {extra}")
    ids, aux, mask = rec["input_ids"], rec["aux_hidden_states"], rec["loss_mask"]
    if not isinstance(rec["conversation_id"], str) or not rec["conversation_id"]:
        fail("conversation_id must be a non-empty string")
    for name in sorted(expected - {"conversation_id"}):
        if not isinstance(rec[name], torch.Tensor):
            fail(f"{name} is {type(rec[name]).__name__}, expected a tensor")
    if ids.dtype != torch.int64 or ids.dim() != 1 or ids.numel() < 2:
        fail(f"input_ids must be int64 [T] with T >= 2, got {ids.dtype} {list(ids.shape)}")
    t = ids.shape[0]
    final = rec.get("hidden_states")
    if final is not None and (final.dim() != 2 or final.shape[0] != t or not final.is_floating_point()):
        fail(f"hidden_states must be float [T={t}, H], got {final.dtype} {list(final.shape)}")
    h = final.shape[1] if final is not None else meta["hidden_size"] if meta is not None else None
    if aux.dim() != 2 or aux.shape[0] != t or aux.shape[1] == 0 or (h and aux.shape[1] % h) or \
            (final is not None and aux.dtype != final.dtype):
        fail(f"aux_hidden_states must be {aux.dtype if final is None else final.dtype} [T={t}, n*{h or 'H'}], "
             f"got {aux.dtype} {list(aux.shape)}")
    for key in [k for k in SCALE_KEYS if k in rec] if fp8 else []:
        scale = rec[SCALE_KEYS[key]]
        if scale.dtype != torch.float32 or scale.dim() != 2 or scale.shape[0] != t or \
                rec[key].shape[1] % scale.shape[1] or not bool(torch.isfinite(scale).all()):
            fail(f"{SCALE_KEYS[key]} must be finite float32 [T={t}, layers], got {scale.dtype} {list(scale.shape)}")
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
        if dtype_name(aux.dtype) != meta["dtype"]:
            fail(f"dtype {dtype_name(aux.dtype)} disagrees with meta dtype {meta['dtype']}")
        if fp8 and rec["aux_scale"].shape[1] != n:
            fail(f"aux_scale has {rec['aux_scale'].shape[1]} columns for {n} target layers")
        if t > meta["max_seq_len"]:
            fail(f"T={t} exceeds meta max_seq_len {meta['max_seq_len']}")
    return rec


def load_dump_record(path: str | os.PathLike, meta: dict | None = None, mmap: bool = False,
                     dequantize: bool = True) -> dict:
    """Load and validate one `<conversation_id>.pt`. Safe on untrusted files (weights_only); `mmap` maps the tensors
    instead of reading them (cheap checks of big files). fp8 states come back dequantized to bfloat16, without their
    scales, unless `dequantize` is False."""
    try:
        rec = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # a torn or foreign file: say which, whatever torch raised
        raise DumpFormatError(f"{path}: not a loadable dump record ({type(e).__name__}: {e})") from e
    validate_dump_record(rec, meta, where=str(path))
    if Path(path).name != rec["conversation_id"] + RECORD_SUFFIX:
        raise DumpFormatError(f"{path}: file name does not match conversation_id {rec['conversation_id']!r}")
    if dequantize and rec["aux_hidden_states"].dtype == torch.float8_e4m3fn:
        for key in [k for k in SCALE_KEYS if k in rec]:
            rec[key] = dequantize_fp8(rec[key], rec.pop(SCALE_KEYS[key]))
    return rec


def save_dump_record(directory: str | os.PathLike, rec: dict) -> Path:
    """Validate and write `<conversation_id>.pt` atomically: a file under its final name is always complete."""
    validate_dump_record(rec, where=f"record {rec.get('conversation_id')!r}")
    buf = io.BytesIO()
    # torch.save writes a view's whole storage: a slice of a bigger capture buffer would silently bloat the file.
    compact = {k: v.clone() if isinstance(v, torch.Tensor) and v.untyped_storage().nbytes() != v.numel() * v.element_size()
               else v for k, v in rec.items()}
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
    if meta["dtype"] not in STORAGE_DTYPES:
        fail(f"dtype {meta['dtype']!r} not one of {sorted(STORAGE_DTYPES)}")
    if meta["final_state"] not in FINAL_STATES:
        fail(f"final_state {meta['final_state']!r} must be one of {FINAL_STATES}")
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
