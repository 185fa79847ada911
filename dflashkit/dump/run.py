"""One dump shard: generated conversations -> `<id>.pt` hidden-state records + meta.json (docs/FORMATS.md).

Shard k of n takes the generated records with `generation.index % n == k`. Every record of the shard lands exactly once:
as a `.pt` file (written atomically; a rerun keeps the ones that load) or as one line in the shard's errors file. The
done-marker is written last, only when written + skipped + errors == input. A backend failure (OOM, engine crash)
stops the shard with exit 1 and no marker; the rerun resumes.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from pathlib import Path

import torch
from tqdm import tqdm

from ..config import ConfigError
from ..formats import BadRecord
from ..io import require_local_model
from ..model.layers import (
    CONVENTION,
    FINAL_STATE,
    check_target_layer_ids,
    default_target_layer_ids,
    hidden_size,
    num_hidden_layers,
)
from ..shards import (
    EXIT_FAILED,
    EXIT_OK,
    ErrorLog,
    ShardCounts,
    ShardFiles,
    UnusableInput,
    add_shard_flags,
    fingerprint,
    require_usable,
    resolve_shard,
    setup_logging,
    write_done_marker,
)
from ..templates import MaskSource, mask_source, read_template, template_sha256
from . import format as fmt
from .records import GeneratedRecord, generated_files, iter_generated, record_messages
from .tokenize import tokenize_conversation

log = logging.getLogger("dflashkit.dump")
# Reasons that mean "the input breaks a rule" (kind skipped); anything else is kind error.
SKIP_REASONS = {"too_long", "empty", "no_assistant_turn", "role_order", "missing_key", "bad_id", "duplicate_id",
                "unknown_role", "non_text_content", "bad_type", "ambiguous", "bad_json", "bad_encoding"}


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def build_parser(prog: str, backend: str | None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Dump target-model hidden states for DFlash training.")
    if backend is None:
        p.add_argument("--backend", choices=["vllm", "hf"], required=True)
    p.add_argument("--model", required=True, help="HF model dir or name")
    p.add_argument("--input", required=True, help="generate output dir (shard-*.jsonl) or one .jsonl file")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--chat-template", default=None,
                   help="default: the tokenizer's own chat_template, each reply located in its rendering; or a "
                        "template (path or name under configs/templates/): a training template's generation spans "
                        "(smollm2-thinking-train), or the replies located in any other")
    p.add_argument("--end-of-turn", default=None,
                   help="located replies: the token ending a reply; default: the one the template writes after it")
    p.add_argument("--tokenizer", default=None, help="default: --model")
    p.add_argument("--max-seq-len", type=int, default=8192)
    p.add_argument("--length-policy", choices=["skip", "truncate"], default="skip",
                   help="a conversation over --max-seq-len tokens: skip it (error line) or cut it")
    layers = p.add_mutually_exclusive_group()
    layers.add_argument("--target-layer-ids", type=_ints, default=None, help="DFlash ids, e.g. 1,9,17,25,33")
    layers.add_argument("--num-draft-layers", type=int, default=5,
                        help="default target ids: DFlash spread of this many layers over [1, L-3]")
    p.add_argument("--dtype", default="auto", choices=["auto", *fmt.STORAGE_DTYPES],
                   help="how the states are stored; auto: the config's dtype. float8_e4m3fn: the model runs in "
                        "bfloat16, states are stored as fp8 with one scale per token and layer (half of bf16)")
    p.add_argument("--no-final-state", action="store_true",
                   help="do not store the final state (meta final_state 'none'): only KD (loss.kd_weight > 0) reads it")
    p.add_argument("--tp", type=int, default=1, help="tensor parallel size (vLLM)")
    p.add_argument("--block-size", type=int, default=None, help="vLLM KV block size (MiniMax-M3: 128)")
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--language-model-only", action="store_true", help="vLLM: load only the text model of a VL model")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--gpu-memory-utilization", type=float, default=None)
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="vLLM prefill token budget per step; longer prompts are prefilled in chunks")
    p.add_argument("--batch-size", type=int, default=None,
                   help="conversations per backend call (vllm 64, hf 1); vLLM keeps each capture file of a call on "
                        "disk until it is read")
    add_shard_flags(p)
    p.add_argument("--allow-empty-input", action="store_true",
                   help="an input with no records completes the shard (by default it is a failure)")
    p.add_argument("--no-progress", action="store_true")
    return p


def parse_args(argv: list[str] | None, prog: str, backend: str | None) -> argparse.Namespace:
    p = build_parser(prog, backend)
    args = p.parse_args(argv)
    if backend is not None:
        args.backend = backend
    resolve_shard(p, args)
    if args.max_seq_len < 2:
        p.error("--max-seq-len must be >= 2")
    if args.batch_size is not None and args.batch_size < 1:
        p.error("--batch-size must be >= 1")
    args.batch_size = args.batch_size or (64 if args.backend == "vllm" else 1)
    return args


def resolve_mask_source(tokenizer, template: str | None, end_of_turn: str | None) -> MaskSource:
    try:
        return mask_source(tokenizer, template, end_of_turn)
    except ValueError as e:  # no template to render, a slow tokenizer: the shard cannot start
        raise SystemExit(f"dump: {e}") from None


def resolve_model(args: argparse.Namespace, source: MaskSource) -> dict:
    """Layer count, width, dtype and target ids from the model config, and the mask source: the static part of
    meta.json."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
    n_layers, width = num_hidden_layers(config), hidden_size(config)
    try:
        ids = args.target_layer_ids or default_target_layer_ids(n_layers, args.num_draft_layers)
        check_target_layer_ids(ids, n_layers)
    except ValueError as e:  # --target-layer-ids / --num-draft-layers that do not fit this model: the user's mistake
        raise ConfigError(str(e)) from None
    dtype = args.dtype
    if dtype == "auto":
        text_cfg = getattr(config, "text_config", None) or config
        dtype = fmt.dtype_name(getattr(text_cfg, "dtype", None) or getattr(config, "dtype", None) or torch.float32)
    if dtype not in fmt.STORAGE_DTYPES:
        raise SystemExit(f"model dtype {dtype!r} is not one of {sorted(fmt.STORAGE_DTYPES)}; pass --dtype")
    return {
        "format": fmt.FORMAT_VERSION, "model": args.model, "backend": args.backend, "dtype": dtype,
        "hidden_size": width, "num_hidden_layers": n_layers, "target_layer_ids": ids,
        "layer_id_convention": CONVENTION, "final_state": "none" if args.no_final_state else FINAL_STATE,
        "max_seq_len": args.max_seq_len,
        "length_policy": args.length_policy, "chat_template_sha256": template_sha256(source.template),
        "chat_template": args.chat_template or "tokenizer", "mask_source": source.kind,
        "end_of_turn": source.end_of_turn,
    }


def make_backend(args: argparse.Namespace, meta: dict):
    if args.backend == "hf":
        from .hf_backend import HFBackend

        return HFBackend(args.model, fmt.compute_dtype(meta["dtype"]), meta["target_layer_ids"],
                         trust_remote_code=args.trust_remote_code)
    from .vllm_backend import VLLMBackend

    return VLLMBackend(args.model, fmt.dtype_name(fmt.compute_dtype(meta["dtype"])), meta["target_layer_ids"], meta["num_hidden_layers"],
                       args.max_seq_len, args.output_dir, tp=args.tp, block_size=args.block_size,
                       enforce_eager=args.enforce_eager, language_model_only=args.language_model_only,
                       trust_remote_code=args.trust_remote_code, gpu_memory_utilization=args.gpu_memory_utilization,
                       max_num_batched_tokens=args.max_num_batched_tokens)


@dataclasses.dataclass
class DumpCounts(ShardCounts):
    resumed: int = 0
    tokens: int = 0
    loss_tokens: int = 0
    truncated: int = 0

    def add_tokens(self, mask: torch.Tensor) -> None:
        self.tokens += mask.numel()
        self.loss_tokens += int(mask.sum())


def readable(rec: GeneratedRecord) -> bool:
    return rec.error is None or rec.error.reason not in ("bad_encoding", "bad_json")


def same_tokens(old: dict, input_ids: list[int], loss_mask: list[int]) -> bool:
    """An earlier file is kept only for the same tokens: a regenerated conversation (T > 0) gets a new record."""
    return old["input_ids"].tolist() == input_ids and old["loss_mask"].tolist() == loss_mask


def run_shard(args: argparse.Namespace) -> int:
    out_dir = Path(args.output_dir)
    files = ShardFiles(out_dir, args.shard_id, args.num_shards)
    done, stem = files.done, files.name
    if done.exists():
        log.info("%s is already done (%s); nothing to do", stem, done)
        return EXIT_OK
    generated_files(args.input)  # a missing or empty input dir fails here, before anything is written
    made_from = fingerprint(args.input)  # taken before reading: a generate shard redone meanwhile makes this stale
    all_records = require_usable(iter_generated(args.input), readable, f"input {args.input}", args.allow_empty_input)
    from transformers import AutoTokenizer

    require_local_model(args.model, "--model")
    if args.tokenizer:
        require_local_model(args.tokenizer, "--tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model, trust_remote_code=args.trust_remote_code)
    try:  # None: the tokenizer's own
        template = read_template(args.chat_template) if args.chat_template else None
    except OSError as e:  # a template name that is not there: the flag's mistake, before anything is written
        raise ConfigError(f"--chat-template: {e}") from None
    source = resolve_mask_source(tokenizer, template, args.end_of_turn)
    static = resolve_model(args, source)
    log.info("target layers %s (%s); final state %s; stored as %s; loss mask: %s of %s", static["target_layer_ids"],
             CONVENTION, static["final_state"], static["dtype"], source.kind, static["chat_template"])
    out_dir.mkdir(parents=True, exist_ok=True)
    fmt.write_meta(out_dir, static)  # refuses a dir holding a different dump before any work

    c = DumpCounts()
    t0 = time.time()
    backend = None
    seen: set[str] = set()
    pending: list[tuple[str, list[int], list[int]]] = []
    with ErrorLog(files.errors, "dump", c, log) as errors:

        def fail(cid: str, source: str, exc: BadRecord) -> None:
            errors.fail(cid, source, "skipped" if exc.reason in SKIP_REASONS else "error", exc.reason, exc.detail)

        def flush() -> None:
            nonlocal backend
            if not pending:
                return
            if backend is None:
                backend = make_backend(args, static)
            masks = {cid: mask for cid, _, mask in pending}
            inputs = {cid: ids for cid, ids, _ in pending}
            for cid, final, aux in backend.hidden_states([(cid, ids) for cid, ids, _ in pending]):
                rec = {"input_ids": torch.tensor(inputs[cid], dtype=torch.int64), "hidden_states": final,
                       "aux_hidden_states": aux, "loss_mask": torch.tensor(masks[cid], dtype=torch.uint8),
                       "conversation_id": cid}
                rec = fmt.to_storage(rec, static["dtype"], len(static["target_layer_ids"]),
                                     keep_final=static["final_state"] != "none")
                try:
                    fmt.save_dump_record(out_dir, rec)
                except OSError as e:  # a full disk names no file: name the record's, for main()'s one line
                    e.filename = e.filename or str(out_dir / (cid + fmt.RECORD_SUFFIX))
                    raise
                c.written += 1
                c.add_tokens(rec["loss_mask"])
                progress.update(1)
            pending.clear()

        records = (r for r in all_records if r.position % args.num_shards == args.shard_id)
        progress = tqdm(desc=stem, unit="conv", disable=args.no_progress)
        try:
            for rec in records:
                c.input += 1
                if rec.id in seen:
                    fail(rec.id, rec.source, BadRecord("duplicate_id", f"id {rec.id!r} already seen in this shard"))
                    continue
                seen.add(rec.id)
                if rec.error is not None:
                    fail(rec.id, rec.source, rec.error)
                    continue
                try:
                    tok = tokenize_conversation(tokenizer, record_messages(rec.record), rec.template_kwargs,
                                                template, args.max_seq_len, args.length_policy, args.end_of_turn)
                except BadRecord as e:
                    fail(rec.id, rec.source, e)
                    continue
                path = out_dir / (rec.id + fmt.RECORD_SUFFIX)
                if path.exists():
                    try:
                        old = fmt.load_dump_record(path, static, mmap=True, dequantize=False)
                    except fmt.DumpFormatError as e:
                        log.warning("%s: redoing an unusable earlier file: %s", rec.id, e)
                    else:
                        if same_tokens(old, tok.input_ids, tok.loss_mask):
                            c.written += 1
                            c.resumed += 1
                            c.add_tokens(old["loss_mask"])
                            progress.update(1)
                            continue
                        log.info("%s: the conversation changed since its earlier file; redoing it", rec.id)
                if tok.truncated_from is not None:
                    c.truncated += 1
                    log.info("%s: truncated from %d to %d tokens", rec.id, tok.truncated_from, len(tok.input_ids))
                pending.append((rec.id, tok.input_ids, tok.loss_mask))
                if len(pending) >= args.batch_size:
                    flush()
            flush()
        finally:
            progress.close()
            if backend is not None:
                backend.close()
    wall = time.time() - t0
    summary = (f"input={c.input} written={c.written} (resumed {c.resumed}) skipped={c.skipped} errors={c.errors} "
               f"tokens={c.tokens} loss_tokens={c.loss_tokens} truncated={c.truncated} wall={wall:.1f}s")
    if not c.balanced():
        log.error("%s counts do not add up: %s", stem, summary)
        return EXIT_FAILED
    write_done_marker(done, "dump", {**c.marker_counts(), "resumed": c.resumed}, made_from,
                      shard_id=args.shard_id, num_shards=args.num_shards,
                      tokens={"total": c.tokens, "loss": c.loss_tokens, "truncated": c.truncated},
                      wall_time_s=round(wall, 3), args=vars(args))
    fmt.write_meta(out_dir, static)  # refresh the counts with this shard's marker
    log.info("%s done: %s", stem, summary)
    return EXIT_OK


def main(argv: list[str] | None = None, backend: str | None = None, prog: str = "dflashkit dump") -> int:
    setup_logging()
    args = parse_args(argv, prog, backend)
    log.info("resolved configuration: %s", json.dumps(vars(args), sort_keys=True, default=str))
    try:
        return run_shard(args)
    except fmt.DumpFormatError as e:  # the shard cannot start: one clear line, exit 1
        log.error("%s", e)
        return EXIT_FAILED
    except (OSError, UnusableInput) as e:  # a missing or empty input, a full disk: one line with the path, exit 1
        log.error("dump %s: %s", ShardFiles(Path(args.output_dir), args.shard_id, args.num_shards).name, e)
        return EXIT_FAILED
