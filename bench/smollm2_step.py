"""The SmolLM2 quality recipe's training throughput, end to end (data loading included) on one GPU: tokens/s over
logged intervals, through the real entry point.

    python bench/smollm2_step.py --work /tmp/s2 [--records 640] [--steps 100] [--warmup-steps 30] [--trainer DIR]
        [--log-every 10] [--interval 10] [--profile-steps K] [--log-recompiles] [--set key=value ...]

Writes once into --work a dump of random records at SmolLM2-135M's dims (target layers [1, 8, 14, 20, 27], hidden
576, bf16, with the final states the recipe's KD reads; lengths log-normal around ShareGPT's, median 256 tokens, cut
to 32..2048; the loss mask on the last 3/4) and a target folder (SmolLM2's config.json, random embed_tokens and
norm), then runs `train_dflash.py --config configs/train/smollm2-quality.yaml` of the checkout --trainer (this one by
default; an older checkout measures the step before a change) for --steps steps, no held-out scoring. Every logged
row says how many tokens its interval trained and how long it took (`tokens`, `step_time_s` per step since the
previous row; a trainer that logs single steps is read with --log-every 1 and summed per --interval steps). Prints
one JSON line: tokens/s after the warm-up steps, per interval, and the slowest interval over the fastest.
What could make the intervals uneven: `--log-recompiles` runs the trainer with TORCH_LOGS=recompiles and counts the
recompilations by the logged step they follow (`recompiles_after_step`); `--profile-steps K` runs K more steps under
the trainer's profiler (profile.start), left out of the figures, its summary in the line (host vs device time of the
batch wait and the step; the whole table in WORK/train-NAME/profile). The trainer's log is WORK/train-NAME.log.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dflashkit.dump.format import FORMAT_VERSION, save_dump_record, write_meta
from dflashkit.model.layers import CONVENTION
from dflashkit.train.profile import summary

LAYER_IDS = [1, 8, 14, 20, 27]  # the quality run's dump (--num-draft-layers 5 on SmolLM2's 30 layers)
SMOLLM2 = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536,
           "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
           "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "max_position_embeddings": 8192, "vocab_size": 49152,
           "tie_word_embeddings": True, "attention_bias": False, "hidden_act": "silu"}


def make_data(work: Path, records: int, seed: int = 0) -> tuple[Path, Path]:
    target, dump = work / "target", work / "dump"
    if (dump / "meta.json").exists() and (target / "model.safetensors").exists():
        return target, dump
    from safetensors.torch import save_file

    target.mkdir(parents=True, exist_ok=True)
    dump.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    h, v = SMOLLM2["hidden_size"], SMOLLM2["vocab_size"]
    (target / "config.json").write_text(json.dumps(SMOLLM2))
    save_file({"model.embed_tokens.weight": torch.randn(v, h, generator=g) * 0.02,
               "model.norm.weight": torch.ones(h)}, str(target / "model.safetensors"))
    lengths = torch.exp(torch.randn(records, generator=g) * 0.8 + 5.55).clamp(32, 2048).long()
    for i, t in enumerate(lengths.tolist()):
        save_dump_record(dump, {
            "conversation_id": f"synthetic-{i:06d}", "input_ids": torch.randint(0, v, (t,), generator=g),
            "aux_hidden_states": torch.randn(t, len(LAYER_IDS) * h, generator=g).to(torch.bfloat16),
            "hidden_states": torch.randn(t, h, generator=g).to(torch.bfloat16),
            "loss_mask": (torch.arange(t) >= t // 4).to(torch.uint8)})
    write_meta(dump, {"format": FORMAT_VERSION, "model": str(target), "backend": "hf", "dtype": "bfloat16",
                      "hidden_size": h, "num_hidden_layers": SMOLLM2["num_hidden_layers"], "target_layer_ids": LAYER_IDS,
                      "layer_id_convention": CONVENTION, "final_state": "pre_norm", "max_seq_len": 2048,
                      "length_policy": "truncate", "chat_template_sha256": "synthetic", "chat_template": "synthetic"})
    return target, dump


def intervals(rows: list[dict], interval: int, after: int) -> list[dict]:
    """Per `interval` steps past step `after`: tokens and seconds summed from rows that each cover the steps since
    the previous row."""
    out, tokens, seconds, first, prev = [], 0.0, 0.0, None, 0
    for row in rows:
        steps, prev_step, prev = row["step"] - prev, prev, row["step"]
        if row["step"] <= after:
            continue
        tokens, seconds = tokens + row["tokens"], seconds + row["step_time_s"] * steps
        first = prev_step + 1 if first is None else first
        if row["step"] - first + 1 >= interval:
            out.append({"steps": [first, row["step"]], "tokens": int(tokens), "seconds": round(seconds, 3),
                        "tokens_per_s": round(tokens / seconds)})
            tokens, seconds, first = 0.0, 0.0, None
    return out


def recompiles_after_step(log: str) -> dict[int, int]:
    """Recompilations (TORCH_LOGS=recompiles) counted by the last logged step before them (0: before the first)."""
    step, out = 0, {}
    for line in log.splitlines():
        logged = re.search(r"dflashkit\.train\.metrics: step (\d+) \|", line)
        if logged:
            step = int(logged.group(1))
        elif "Recompiling function" in line:
            out[step] = out.get(step, 0) + 1
    return out


def extra(args, out: Path, log: str) -> dict:
    """The optional parts of the JSON line: recompilations and the profile's summary."""
    row = {}
    if args.log_recompiles:
        row["recompiles_after_step"] = recompiles_after_step(log)
    if args.profile_steps:
        row["profile"] = summary(out / "profile")
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", required=True)
    p.add_argument("--records", type=int, default=640)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--warmup-steps", type=int, default=30, help="steps left out of the figures (compilation)")
    p.add_argument("--trainer", default=str(REPO), help="checkout whose train_dflash.py runs")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--interval", type=int, default=10, help="steps per reported interval")
    p.add_argument("--name", default="after")
    p.add_argument("--set", nargs="*", default=[], help="more dotted overrides (e.g. step=plain)")
    p.add_argument("--profile-steps", type=int, default=0,
                   help="this many more steps under the trainer's profiler, left out of the figures")
    p.add_argument("--log-recompiles", action="store_true", help="count torch.compile's recompilations by step")
    args = p.parse_args(argv)
    work = Path(args.work)
    t0 = time.perf_counter()
    target, dump = make_data(work, args.records)
    made = time.perf_counter() - t0
    out = work / f"train-{args.name}"
    trainer = Path(args.trainer).resolve()
    cmd = [sys.executable, str(trainer / "train_dflash.py"), "--config",
           str(trainer / "configs/train/smollm2-quality.yaml"), f"target_model={target}", f"output_dir={out}",
           f"data.dump_dirs=[{dump}]", f"optim.max_steps={args.steps + args.profile_steps}",
           f"log_every={args.log_every}", "data.heldout_records=0", f"checkpoint_every={10 ** 9}", *args.set]
    if args.profile_steps:
        cmd += [f"profile.start={args.steps + 1}", f"profile.steps={args.profile_steps}"]
    if out.exists():
        subprocess.run(["rm", "-rf", str(out)], check=True)
    env = {**os.environ, "PYTHONPATH": str(trainer)}
    if args.log_recompiles:
        env["TORCH_LOGS"] = "recompiles"
    t1 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=trainer, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t1
    (work / f"train-{args.name}.log").write_text(proc.stderr)
    if proc.returncode != 0:
        print(json.dumps({"run": f"smollm2-{args.name}", "failed": proc.returncode,
                          "stderr_tail": proc.stderr[-1500:]}), flush=True)
        return 1
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in {r["step"]: r for r in rows}.values() if r["step"] <= args.steps]  # not the profiled ones
    spans = intervals(rows, args.interval, args.warmup_steps)
    tokens, seconds = sum(s["tokens"] for s in spans), sum(s["seconds"] for s in spans)
    rates = [s["tokens_per_s"] for s in spans]
    print(json.dumps({"run": f"smollm2-{args.name}", "trainer": str(trainer), "overrides": args.set,
                      "steps": args.steps, "warmup_steps": args.warmup_steps, "records": args.records,
                      "data_s": round(made, 1), "train_wall_s": round(wall, 1),
                      "tokens_per_s": round(tokens / seconds) if seconds else None,
                      "slowest_over_fastest": round(min(rates) / max(rates), 3) if rates else None,
                      "intervals": spans, "peak_mem_gb": max(r["peak_mem_gb"] for r in rows),
                      "last_loss": rows[-1]["loss"], **extra(args, out, proc.stderr)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
