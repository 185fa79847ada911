"""`dflashkit eval`: acceptance of a draft, measured by our loop and, with `--vllm`, by a real vLLM server.

    dflashkit eval --draft RUN/export/draft --target MODEL_DIR --out RUN/eval \
        --mtbench prompts/mtbench.jsonl [--heldout prompts/sharegpt.jsonl --heldout-skip 16] \
        [--vllm --vllm-extra-args "--dtype float32 --enforce-eager"] [--sampling-temperature 0.7]

Writes OUT/report.json (tau, per-position acceptance and the acceptance-length histogram, overall and per category;
the lossless check; vLLM's figures and how they agree with ours), OUT/generations.jsonl (one line per prompt) and PNG
plots when matplotlib is installed. `--draft` is an exported folder (`dflashkit export`) or a training checkpoint; vLLM
is given it as it is, so export first for `--vllm`. Exit code 1 when the lossless check fails.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from dflashkit.eval.prompts import HELDOUT_CATEGORY, EvalPrompt, load_prompts
from dflashkit.eval.spec import Generation, SpeculativeDecoder, acceptance_stats
from dflashkit.eval.vllm_metrics import SpecCounters, VllmClient, norms_keys_per_layer
from dflashkit.io import JsonlAppender, atomic_write_json, require_local_model

log = logging.getLogger(__name__)


def _progress(items, desc: str):
    return tqdm(items, desc=desc, file=sys.stderr)  # tqdm comes with transformers


def summarize(accepted: dict[str, list[int]], prompts: list[EvalPrompt], num_drafted: int) -> dict:
    """Our figures overall and per category from the accepted counts of every step of every prompt."""
    by_cat: dict[str, list[int]] = {}
    for p in prompts:
        by_cat.setdefault(p.category, []).extend(accepted[p.id])
    return {"overall": acceptance_stats([a for p in prompts for a in accepted[p.id]], num_drafted),
            "by_category": {c: acceptance_stats(acc, num_drafted) for c, acc in sorted(by_cat.items())}}


def eos_token_ids(target, tokenizer) -> set[int]:
    """The tokens that end an answer: the generation config's EOS ids and the tokenizer's."""
    configured = target.generation_config.eos_token_id
    eos = {int(t) for t in ([configured] if isinstance(configured, int) else configured or [])}
    return eos | {tokenizer.eos_token_id}


def run_ours(decoder: SpeculativeDecoder, prompts: list[EvalPrompt], max_new_tokens: int, temperature: float,
             eos: set[int], seed: int) -> dict[str, Generation]:
    generator = torch.Generator(device=decoder.device).manual_seed(seed)
    return {p.id: decoder.generate(p.prompt_ids, max_new_tokens, temperature, eos, generator)
            for p in _progress(prompts, f"ours T={temperature}")}


def lossless_check(decoder: SpeculativeDecoder, prompts: list[EvalPrompt], greedy: dict[str, Generation],
                   max_new_tokens: int, eos: set[int]) -> dict:
    """Greedy speculative output against the target decoding alone, token by token."""
    mismatches = []
    for p in _progress(prompts, "target alone"):
        reference = decoder.generate_target_only(p.prompt_ids, max_new_tokens, eos)
        ours = greedy[p.id].output_ids
        if reference != ours:
            first = next((i for i, (a, b) in enumerate(zip(reference, ours)) if a != b), min(len(reference), len(ours)))
            mismatches.append({"id": p.id, "first_difference": first})
    return {"prompts": len(prompts), "identical": len(prompts) - len(mismatches), "mismatches": mismatches}


def _settled(client: VllmClient, timeout: float = 5.0) -> SpecCounters:
    """The counters once they stop moving: vLLM records a request's last step around when it answers."""
    last = client.counters()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = client.counters()
        if now == last:
            return now
        last = now
    return last


def run_vllm(client: VllmClient, prompts: list[EvalPrompt], max_new_tokens: int) -> dict[str, tuple[list[int], SpecCounters]]:
    """Greedy completions one request at a time, with each request's share of vLLM's spec-decode counters."""
    results = {}
    before = _settled(client)
    for p in _progress(prompts, "vLLM T=0"):
        output = client.complete(p.prompt_ids, max_new_tokens, temperature=0.0)
        after = _settled(client)
        results[p.id] = (output, after - before)
        before = after
    return results


def summarize_vllm(results: dict[str, tuple[list[int], SpecCounters]], prompts: list[EvalPrompt]) -> dict:
    def total(ids: list[str]) -> SpecCounters:
        parts = [results[i][1] for i in ids]
        return SpecCounters(sum(c.drafts for c in parts), sum(c.accepted for c in parts),
                            [sum(col) for col in zip(*(c.per_position for c in parts))])

    cats = sorted({p.category for p in prompts})
    return {"overall": total([p.id for p in prompts]).stats(),
            "by_category": {c: total([p.id for p in prompts if p.category == c]).stats() for c in cats}}


def agreement(ours: dict, vllm: dict, greedy: dict[str, Generation], vllm_results: dict) -> dict:
    o, v = ours["overall"], vllm["overall"]
    same_counts = sum(1 for i, g in greedy.items()
                      if (g.steps, sum(g.accepted)) == (vllm_results[i][1].drafts, vllm_results[i][1].accepted))
    return {
        "tau_ours": o["tau"], "tau_vllm": v["tau"],
        "tau_abs_diff": abs(o["tau"] - v["tau"]) if o["tau"] is not None and v["tau"] is not None else None,
        "per_position_max_abs_diff": max((abs(a - b) for a, b in zip(o["per_position"], v["per_position"])),
                                         default=0.0),
        "prompts": len(greedy),
        "prompts_with_identical_step_counts": same_counts,
        "outputs_identical": sum(1 for i, g in greedy.items() if g.output_ids == vllm_results[i][0]),
    }


def evaluate(args: argparse.Namespace) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dflashkit.export import load_draft, resolve_checkpoint
    from dflashkit.model import kind_of

    require_local_model(args.target, "--target")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(args.target)
    template = Path(args.chat_template).read_text(encoding="utf-8") if args.chat_template else None
    kwargs = json.loads(args.chat_template_kwargs) if args.chat_template_kwargs else None
    prompts: list[EvalPrompt] = []
    if args.mtbench:
        prompts += load_prompts(args.mtbench, tokenizer, per_category=args.per_category, limit=args.limit,
                                chat_template=template, template_kwargs=kwargs)
    if args.heldout:
        prompts += load_prompts(args.heldout, tokenizer, category=HELDOUT_CATEGORY, skip=args.heldout_skip,
                                limit=args.heldout_count, chat_template=template, template_kwargs=kwargs)
    if not prompts:
        raise ValueError("no prompts: pass --mtbench and/or --heldout")
    if len({p.id for p in prompts}) != len(prompts):
        raise ValueError("prompt ids repeat across the prompt sets")
    log.info("%d prompts: %s", len(prompts), {c: sum(p.category == c for p in prompts)
                                              for c in sorted({p.category for p in prompts})})

    target = AutoModelForCausalLM.from_pretrained(args.target, dtype=args.dtype, device_map=args.device)
    draft_dir = resolve_checkpoint(args.draft)
    draft = load_draft(draft_dir).to(device=target.get_output_embeddings().weight.device)
    decoder = SpeculativeDecoder(target, draft, args.block_size)
    drafted = decoder.num_drafts
    eos = eos_token_ids(target, tokenizer)

    greedy = run_ours(decoder, prompts, args.max_new_tokens, 0.0, eos, args.seed)
    report: dict = {"config": {k: v for k, v in vars(args).items()} | {"draft_dir": str(draft_dir),
                                                                       "num_drafted": drafted,
                                                                       "draft_layers": draft.config.num_hidden_layers},
                    "ours": summarize({i: g.accepted for i, g in greedy.items()}, prompts, drafted)}
    if args.sampling_temperature:
        sampled = run_ours(decoder, prompts, args.max_new_tokens, args.sampling_temperature, eos, args.seed)
        report["ours_sampling"] = {"temperature": args.sampling_temperature,
                                   **summarize({i: g.accepted for i, g in sampled.items()}, prompts, drafted)}
    if not args.skip_lossless:
        report["lossless"] = lossless_check(decoder, prompts, greedy, args.max_new_tokens, eos)

    vllm_results = {}
    if args.vllm:
        from dflashkit.serve import running_server, split_extra_args

        spec = json.dumps({"method": kind_of(draft.config).vllm_method, "model": str(draft_dir),
                           "num_speculative_tokens": drafted})
        extra = ["--speculative-config", spec, *split_extra_args(args.vllm_extra_args)]
        with running_server("vllm", args.target, "eval-target", out / "vllm-server.log", extra_args=extra,
                            timeout=args.vllm_startup_timeout) as server:
            client = VllmClient(server.url, server.api_key, server.model)
            vllm_results = run_vllm(client, prompts, args.max_new_tokens)
        report["vllm"] = summarize_vllm(vllm_results, prompts)
        report["agreement"] = agreement(report["ours"], report["vllm"], greedy, vllm_results)
        # A 2+ layer draft's context keys are normed in one grouped call: a vLLM kernel that ignores the per-layer
        # weight rows drafts worse than the draft was trained, so its tau sits below ours (docs/EVAL.md).
        report["agreement"]["vllm_norms_context_keys_per_layer"] = norms_keys_per_layer()
        if drafts_with_layer0_key_norm(report):
            log.warning("this vLLM's rms_norm ignores a stacked per-layer weight: it norms every draft layer's context "
                        "keys with layer 0's k_norm, so it drafts worse than the draft was trained and its tau sits "
                        "below ours (docs/EVAL.md)")

    with JsonlAppender(out / "generations.jsonl", truncate=True) as f:
        for p in prompts:
            row = {"id": p.id, "category": p.category, "prompt_tokens": len(p.prompt_ids),
                   "output_ids": greedy[p.id].output_ids, "accepted": greedy[p.id].accepted}
            if p.id in vllm_results:
                row |= {"vllm_output_ids": vllm_results[p.id][0], "vllm_steps": int(vllm_results[p.id][1].drafts),
                        "vllm_accepted_tokens": int(vllm_results[p.id][1].accepted)}
            f.write(row)
    atomic_write_json(out / "report.json", report)

    from dflashkit.eval.plots import training_curve, write_plots

    rows = training_curve(args.train_log) if args.train_log else None
    heldout_log = Path(args.train_log).with_name("heldout.jsonl") if args.train_log else None
    heldout = training_curve(heldout_log) if heldout_log and heldout_log.exists() else None
    write_plots(report, out / "plots", rows, heldout)
    log.info("%s", headline(report))
    print(headline(report))
    lossless = report.get("lossless")
    return 1 if lossless and lossless["mismatches"] else 0


def drafts_with_layer0_key_norm(report: dict) -> bool:
    """vLLM's kernel applies layer 0's k_norm to every layer's context keys, and the draft has layers past the first."""
    return (report.get("agreement", {}).get("vllm_norms_context_keys_per_layer") is False
            and report["config"].get("draft_layers", 1) > 1)


def headline(report: dict) -> str:
    def num(x) -> str:  # tau is None when no step drafted (every output ended at its first token)
        return "n/a" if x is None else f"{x:.3f}"

    o = report["ours"]["overall"]
    parts = [f"tau ours {num(o['tau'])} over {o['steps']} steps"]
    if "vllm" in report:
        a = report["agreement"]
        parts.append(f"vLLM {num(a['tau_vllm'])} (|diff| {num(a['tau_abs_diff'])}, identical outputs "
                     f"{a['outputs_identical']}/{a['prompts']}"
                     + (", its kernel norms every layer's context keys with layer 0's k_norm"
                        if drafts_with_layer0_key_norm(report) else "") + ")")
    if "lossless" in report:
        ll = report["lossless"]
        parts.append(f"lossless {ll['identical']}/{ll['prompts']}")
    return "; ".join(parts)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dflashkit eval", description=__doc__.splitlines()[0])
    p.add_argument("--draft", required=True, help="exported draft folder or training checkpoint")
    p.add_argument("--target", required=True, help="the target's HF folder")
    p.add_argument("--out", required=True, help="output dir (report.json, generations.jsonl, plots/)")
    p.add_argument("--mtbench", help="MT-Bench prompt records (.jsonl), reported per category (first turns)")
    p.add_argument("--per-category", type=int, default=None, help="at most this many MT-Bench prompts per category")
    p.add_argument("--limit", type=int, default=None, help="at most this many MT-Bench prompts")
    p.add_argument("--heldout", help="training prompt records (.jsonl); a slice training did not use")
    p.add_argument("--heldout-skip", type=int, default=0, help="records of --heldout to skip (those trained on)")
    p.add_argument("--heldout-count", type=int, default=20, help="held-out prompts to evaluate")
    p.add_argument("--chat-template", help="a Jinja chat template file (default: the tokenizer's)")
    p.add_argument("--chat-template-kwargs", help='JSON, e.g. \'{"thinking_mode": "disabled"}\'')
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--block-size", type=int, default=None, help="verify block size B (default: the draft's)")
    p.add_argument("--sampling-temperature", type=float, default=0.0,
                   help="also run our loop sampling at this temperature (0: greedy only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-lossless", action="store_true", help="skip decoding with the target alone")
    p.add_argument("--dtype", default="auto", help="target dtype for transformers (auto, float32, bfloat16)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="transformers device_map for the target (cpu, cuda, auto)")
    p.add_argument("--vllm", action="store_true", help="also measure through a vLLM server started with the draft")
    p.add_argument("--vllm-extra-args", default="", help="extra vLLM server flags, one string (shell word rules); the "
                   "next word is the value even when it starts with a dash: --vllm-extra-args --enforce-eager")
    p.add_argument("--vllm-startup-timeout", type=float, default=900)
    p.add_argument("--train-log", help="the trainer's metrics.jsonl, for the loss curve plot (with heldout.jsonl "
                   "beside it, the held-out scores too)")
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The flags, with the values no eval can use refused (argparse's exit 2): also a recipe's eval.args at submit."""
    p = parser()
    args = p.parse_args(argv)
    counts = {"--max-new-tokens": args.max_new_tokens, "--heldout-count": args.heldout_count,
              "--per-category": args.per_category, "--limit": args.limit}
    for flag in [f for f, v in counts.items() if v is not None and v < 1]:
        p.error(f"{flag} must be >= 1")  # an eval of nothing would report tau n/a and exit 0
    if args.heldout_skip < 0 or args.sampling_temperature < 0:
        p.error("--heldout-skip and --sampling-temperature must be >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    from dflashkit.serve import glue_value

    args = parse_args(glue_value(sys.argv[1:] if argv is None else argv, "--vllm-extra-args"))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.info("eval configuration: %s", json.dumps(vars(args)))
    try:
        return evaluate(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        log.error("eval failed: %s", e)
        return 2
