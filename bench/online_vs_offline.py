"""Online vs offline training, side by side in one process (issue 16's two speed figures). Prints JSON lines.

(a) `smollm2`: the SmolLM2 quality recipe (configs/train/smollm2-quality.yaml) on the same records twice through the
    real trainer (`dflashkit.train.loop.train`): offline from an HF dump of them (compute_hidden_states_hf.py's code,
    bf16, 5 target layers, the quality run's dump flags) and online from the generate-format records. Records are
    ShareGPT first turns with their recorded reply, in the generate stage's format (thinking mode "disabled"), so no
    generation is needed. tokens/s: dump positions per second over the steps after --warmup (metrics.jsonl).
    `--group-by-length K` adds both sources with data.group_by_length K; grouped steps differ in size by design,
    so compare their `tokens_per_s_mean` over whole epochs: --warmup one epoch, --steps two (1,280 records at
    micro-batch 32: --steps 80 --warmup 40). `--profile-steps K` runs K more steps in every mode under the trainer's
    profiler (`profile.start`), left out of the figures; each mode's row gains the profile's per-part summary
    (host vs device time of the batch wait, the step and the target's forward; the whole table and trace stay in
    WORK/MODE/profile).
(b) `qwen3-8b`: bench/train_step.py's synthetic step at Qwen3-8B dims (its `qwen3-8b` preset), offline (the batch
    carries the states) vs online (a randomly initialized Qwen3-8B-shaped target, bf16, computes them first):
    median step time and peak memory of each.

On one H200 (the target from the GGUF as bench/quality_run.sh converts it; < 4 minutes in all):

    python bench/train_smollm2_data.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf --tokenizer-dir TOK --model-out /tmp/smollm2 \
        --prompts sharegpt.jsonl
    python bench/online_vs_offline.py --model /tmp/smollm2 --prompts sharegpt.jsonl --work /tmp/ovo

CPU check of the plumbing: `--records 8 --steps 3 --warmup 1 --seq 256 --preset smollm2 --train-overrides
data.micro_batch_size=2 data.num_workers=0 data.max_seq_len=256`.
"""
from __future__ import annotations

import argparse
import gc
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

from dflashkit.config import load_config
from dflashkit.dump.run import main as dump_main
from dflashkit.train.config import TrainConfig
from dflashkit.train.loop import train
from dflashkit.train.online import TargetFeatures
from dflashkit.train.profile import summary

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "configs" / "train" / "smollm2-quality.yaml"


def replied_conversations(path: Path):
    """(line, turns) of each conversation of a .jsonl (ShareGPT or OpenAI layout, e.g. the prepared sharegpt.jsonl or
    generate output) whose first turns are a user turn and a reply."""
    from dflashkit.formats import BadRecord, read_conversation

    with open(path, "rb") as f:
        for raw in f:
            try:
                turns = read_conversation(json.loads(raw))
            except (BadRecord, ValueError):
                continue
            if len(turns) >= 2 and (turns[0].role, turns[1].role) == ("user", "assistant"):
                yield raw, turns


def write_records(prompts: Path, count: int, out: Path, tokenizer) -> int:
    """The first `count` conversations of `prompts` (`replied_conversations`) as generate records of their first
    two turns, with the token counts a server reports (`tokenizer`'s chat template; data.group_by_length reads them)."""
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for _, turns in replied_conversations(prompts):
        i = len(lines)
        messages = [{"role": t.role, "content": t.content} for t in turns[:2]]
        prompt = len(tokenizer.apply_chat_template(messages[:1], add_generation_prompt=True, return_dict=True)
                     ["input_ids"])
        whole = len(tokenizer.apply_chat_template(messages, return_dict=True)["input_ids"])
        lines.append(json.dumps({
            "id": f"conv-{i:06d}", "messages": messages, "thinking_mode": "disabled",
            "generation": {"model": "smollm2", "chat_template_kwargs": {"thinking_mode": "disabled"},
                           "turns": [{"finish_reason": "stop", "prompt_tokens": prompt,
                                      "completion_tokens": whole - prompt}],
                           "truncated": False, "repairs": [], "index": i}}))
        if len(lines) == count:
            break
    if not lines:
        raise SystemExit(f"{prompts}: no conversation with a user turn and a reply")
    (out / "shard-00000-of-00001.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (out / "shard-00000-of-00001.done.json").write_text(json.dumps({"stage": "generate"}))
    return len(lines)


def steady_tokens_per_s(run_dir: Path, warmup: int, last: int) -> dict:
    """Over the steps after `warmup`: the median of the steps' tokens/s (robust to a step that compiles a kernel for a
    new padded length: the modes run in one process, so only the first pays each compilation), the mean (all tokens
    over all time), the median step time and the peak memory; steps after `last` (profiled) are left out."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if warmup < r["step"] <= last]
    seconds = sum(r["tokens"] / r["tokens_per_s"] for r in rows)  # each logged interval's wall time (log_every >= 1)
    return {"tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in rows)),
            "tokens_per_s_mean": round(sum(r["tokens"] for r in rows) / seconds),
            "median_step_s": round(statistics.median(r["step_time_s"] for r in rows), 4),
            "peak_mem_gb": round(max(r["peak_mem_gb"] for r in rows), 2)}


def log(message: str) -> None:
    """Progress on stderr: a run stopped at its limit still says where it was."""
    print(f"{time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


def smollm2(args) -> dict:
    work = args.work
    gen, dump = work / "gen", work / "dump"
    shutil.rmtree(work, ignore_errors=True)
    from transformers import AutoTokenizer

    n = write_records(args.prompts, args.records, gen, AutoTokenizer.from_pretrained(args.model))
    t0 = time.perf_counter()
    log(f"smollm2: dumping {n} records")
    assert dump_main(["--backend", "hf", "--model", str(args.model), "--input", str(gen), "--output-dir", str(dump),
                      "--chat-template", "smollm2-thinking-train", "--num-draft-layers", "5", "--dtype", "bfloat16",
                      "--max-seq-len", str(args.max_seq_len), "--length-policy", "truncate", "--no-progress"]) == 0
    dump_s = time.perf_counter() - t0
    profiled = [f"profile.start={args.steps + 1}", f"profile.steps={args.profile_steps}"] if args.profile_steps else []
    # Online, a step's target forward is queued up to 3 micro-batches ahead (data.online.prefetch 2, then the copy
    # ahead): a window at the run's very end would hold none of them, so 4 more steps follow it.
    tail = args.profile_steps + 4 if args.profile_steps else 0
    common = [f"target_model={args.model}", f"optim.max_steps={args.steps + tail}", *profiled,
              "data.heldout_records=0", "checkpoint_every=1000000", f"log_every={args.log_every}",
              f"data.max_seq_len={args.max_seq_len}", *args.train_overrides]
    online = ["data.source=online", f"data.online.inputs=[{gen}]", "data.online.chat_template=smollm2-thinking-train",
              "data.online.length_policy=truncate"]
    out = {"bench": "online_vs_offline", "part": "smollm2", "records": n, "steps": args.steps, "warmup": args.warmup,
           "dump_s": round(dump_s, 1), "dump_bytes": sum(p.stat().st_size for p in dump.glob("*.pt"))}
    # online: the recipe's data.online.forward_cost_tokens; online-C: the same with C (--forward-costs);
    # online-compiled: the target's forward compiled (--compile-target; its first steps, compiling, are in the warm-up);
    # online-graphs, online-graphs-C: as CUDA graphs (--cuda-graphs), at the recipe's cost and at each C;
    # offline-grouped, online-grouped: micro-batches of similar lengths (--group-by-length)
    modes = [("offline", [f"data.dump_dirs=[{dump}]"]), ("online", online)]
    modes += [(f"online-{c}", [*online, f"data.online.forward_cost_tokens={c}"]) for c in args.forward_costs]
    if args.compile_target:
        modes.append(("online-compiled", [*online, "data.online.compile_target=true"]))
    if args.cuda_graphs:  # online-graphs: the target's forward replayed as CUDA graphs (its captures in the warm-up)
        graphed = [*online, "data.online.cuda_graphs=true"]
        modes.append(("online-graphs", graphed))
        modes += [(f"online-graphs-{c}", [*graphed, f"data.online.forward_cost_tokens={c}"]) for c in args.forward_costs]
    if args.group_by_length:  # -grouped: micro-batches of similar lengths (data.group_by_length)
        grouped = f"data.group_by_length={args.group_by_length}"
        modes += [("offline-grouped", [f"data.dump_dirs=[{dump}]", grouped]), ("online-grouped", [*online, grouped])]
    for mode, extra in modes:
        log(f"smollm2: {mode}")
        cfg = load_config(TrainConfig, str(RECIPE), [*common, f"output_dir={work / mode}", *extra])
        t0 = time.perf_counter()
        train(cfg, resume=False)
        out[mode] = {**steady_tokens_per_s(work / mode, args.warmup, args.steps),
                     "wall_s": round(time.perf_counter() - t0, 1)}
        if args.profile_steps:  # its summary lines: ms a step, then host vs device time of each labelled part
            out[mode]["profile"] = summary(work / mode / "profile")
    out["online_vs_offline_tokens_per_s"] = round(out["online"]["tokens_per_s"] / out["offline"]["tokens_per_s"], 3)
    if args.cuda_graphs:
        for mode in ("online-graphs", *(f"online-graphs-{c}" for c in args.forward_costs)):
            out[f"{mode.replace('-', '_')}_vs_offline_tokens_per_s"] = round(
                out[mode]["tokens_per_s"] / out["offline"]["tokens_per_s"], 3)
    if args.group_by_length:  # means over the steps after the warm-up: whole epochs when --steps is two of them
        for source in ("offline", "online"):
            out[f"{source}_grouped_vs_plain_tokens_per_s_mean"] = round(
                out[f"{source}-grouped"]["tokens_per_s_mean"] / out[source]["tokens_per_s_mean"], 3)
        out["online_grouped_vs_offline_tokens_per_s_mean"] = round(
            out["online-grouped"]["tokens_per_s_mean"] / out["offline"]["tokens_per_s_mean"], 3)
    return out


def random_target(preset: dict, device: torch.device, dtype: torch.dtype):
    """A randomly initialized Qwen3 causal LM of the preset's target shape (no weights needed)."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    config = Qwen3Config(hidden_size=preset["hidden_size"], num_hidden_layers=preset["num_target_layers"],
                         num_attention_heads=preset["num_attention_heads"],
                         num_key_value_heads=preset["num_key_value_heads"], head_dim=preset["head_dim"],
                         intermediate_size=preset["intermediate_size"], vocab_size=preset["vocab_size"],
                         max_position_embeddings=40960, tie_word_embeddings=False)
    with device:
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def timed_steps(trainer, batch, target, steps: int, warmup: int, device: torch.device):
    """(median step time, median target-forward time, peak memory GiB) of `steps` steps after `warmup`."""
    cuda = device.type == "cuda"
    times, forward = [], []
    for step in range(warmup + steps):
        if step == warmup and cuda:
            torch.cuda.reset_peak_memory_stats(device)
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        b = batch
        if target is not None:
            b = target(batch)
            if cuda:
                torch.cuda.synchronize(device)
            forward.append(time.perf_counter() - t0)
        trainer.read(trainer.step([b], lr=1e-4))  # reading the loss waits for the GPU
        times.append(time.perf_counter() - t0)
        log(f"  step {step}: {times[-1]:.3f} s")  # the first steps compile: a stall shows which step it is
    mem = round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if cuda else None  # GiB
    return statistics.median(times[warmup:]), statistics.median(forward[warmup:]) if forward else 0.0, mem


def qwen3(args) -> dict:
    import train_step  # bench/train_step.py: its presets, trainer and synthetic batch

    from dflashkit.train.distributed import init_distributed

    d = init_distributed()  # the GPU where there is one (a bare Dist() is the CPU: the stalls of runs 6 and 7)
    log(f"{args.preset}: building the draft step (compiled)")
    step_args = train_step.parse_args(["--preset", args.preset, "--micro-batch", "1"]
                                      + (["--seq", str(args.seq)] if args.seq else []))
    dcfg, cfg, trainer, batch, seq, anchors = train_step.build(step_args, d)
    out = {"bench": "online_vs_offline", "part": args.preset, "seq": seq, "anchors": anchors, "micro_batch": 1,
           "steps": args.steps, "warmup": args.warmup,
           "device": torch.cuda.get_device_name(d.device) if d.device.type == "cuda" else "cpu"}
    log(f"{args.preset}: offline steps")
    step_s, _, mem = timed_steps(trainer, batch, None, args.steps, args.warmup, d.device)
    out["offline"] = {"step_s": round(step_s, 4), "peak_mem_gib": mem}
    del trainer
    gc.collect()
    torch.cuda.empty_cache() if d.device.type == "cuda" else None
    dtype = torch.bfloat16 if d.device.type == "cuda" else torch.float32
    log(f"{args.preset}: random target")
    model = random_target(train_step.PRESETS[args.preset], d.device, dtype)
    meta = {"target_layer_ids": dcfg.target_layer_ids}
    target = TargetFeatures(model, meta, d.device, dtype, with_final=False,
                            forward_cost=cfg.data.online.forward_cost_tokens)  # one row: one forward anyway
    out["target_params_b"] = round(sum(p.numel() for p in model.parameters()) / 1e9, 2)
    # The online trainer's head is the target's own embed_tokens / lm_head / norm, as in a real online run.
    from dflashkit.train.loop import Trainer

    trainer = Trainer(cfg, d, "pre_norm", dcfg, target.head())
    online_batch = {k: v for k, v in batch.items() if k != "aux_hidden_states"}
    log(f"{args.preset}: online steps")
    step_s, fwd_s, mem = timed_steps(trainer, online_batch, target, args.steps, args.warmup, d.device)
    out["online"] = {"step_s": round(step_s, 4), "target_forward_s": round(fwd_s, 4), "peak_mem_gib": mem}
    out["online_vs_offline_step_time"] = round(out["online"]["step_s"] / out["offline"]["step_s"], 3)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, help="SmolLM2 HF folder (part a)")
    p.add_argument("--prompts", type=Path, help="sharegpt.jsonl: the records' text (part a)")
    p.add_argument("--work", type=Path, default=Path("/tmp/dflashkit-online-vs-offline"))
    p.add_argument("--records", type=int, default=1280)
    p.add_argument("--max-seq-len", type=int, default=2048)
    p.add_argument("--steps", type=int, default=36, help="training steps per mode (part a; part b: at most 5)")
    p.add_argument("--warmup", type=int, default=4, help="steps left out of the figures (part b: at most 2)")
    p.add_argument("--preset", default="qwen3-8b", help="bench/train_step.py preset of part b")
    p.add_argument("--seq", type=int, default=None, help="part b sequence length (default: the preset's)")
    p.add_argument("--parts", default="smollm2,qwen3", help="which parts to run")
    p.add_argument("--train-overrides", nargs="*", default=[], help="extra dotted overrides for part a")
    p.add_argument("--forward-costs", type=int, nargs="*", default=[],
                   help="part a: also train online with each of these data.online.forward_cost_tokens")
    p.add_argument("--compile-target", action="store_true",
                   help="part a: also train online with the target's forward compiled (data.online.compile_target)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="part a: also train online with the target's forward as CUDA graphs (data.online.cuda_graphs), "
                        "at the recipe's forward cost and at each --forward-costs")
    p.add_argument("--group-by-length", type=int, default=0,
                   help="part a: also train offline and online with data.group_by_length at this many global batches")
    p.add_argument("--profile-steps", type=int, default=0,
                   help="part a: this many more steps in every mode under the trainer's profiler, left out of the figures")
    p.add_argument("--log-every", type=int, default=1,
                   help="part a: the trainer's log_every (a logged step reads the GPU on the host; the recipe's is 20)")
    p.add_argument("--record", action="store_true",
                   help="write part a's tokens/s into bench/throughputs.json (the planner's measured figures)")
    args = p.parse_args(argv)
    parts = args.parts.split(",")
    if "smollm2" in parts:
        if not (args.model and args.prompts):
            p.error("part smollm2 needs --model and --prompts")
        row = smollm2(args)
        print(json.dumps(row), flush=True)
        if args.record and torch.cuda.is_available():
            from dflashkit.plan import record_throughput

            hardware = f"{torch.cuda.get_device_name()} (configs/train/smollm2-quality.yaml)"
            for stage, mode in (("train", "offline"), ("train-online", "online")):
                record_throughput("SmolLM2-135M-Instruct", stage, row[mode]["tokens_per_s"], hardware,
                                  "python bench/online_vs_offline.py --parts smollm2 --record")
    if "qwen3" in parts:
        steps = argparse.Namespace(**{**vars(args), "steps": min(args.steps, 5), "warmup": min(args.warmup, 2)})
        print(json.dumps(qwen3(steps)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
