"""The GPU generate engine (dflashkit/generate/engine.py) against transformers on one card, in one run: float32 tokens
equal to HF greedy, bfloat16 agreement, the decode step's time by slot count, and answer tokens/s side by side with
HF `generate()` (batches of 512 sorted by length, as bench/train_smollm2_data.py does) on the same prompts.

    python bench/engine_check.py --model DIR --prompts sharegpt-multiturn.jsonl --out check.json

Prints one line per check and writes them all to --out.
"""
from __future__ import annotations

import argparse
import collections
import json
import time
from pathlib import Path

import torch

from dflashkit.eval.prompts import first_turn
from dflashkit.generate.engine import Engine, Renderer, Request, Sampling, SlotDecoder, eos_ids, load_model
from dflashkit.io import iter_jsonl


def engine_answers(model, eos, prompts, max_new, slots, context=2048):
    done = {}
    engine = Engine(SlotDecoder(model, slots, context), eos)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    engine.run(collections.deque(Request(i, p, max_new) for i, p in enumerate(prompts)),
               lambda r, tokens, reason: done.__setitem__(r.key, tokens))
    torch.cuda.synchronize()
    return [done[i] for i in range(len(prompts))], engine.answer_tokens / (time.perf_counter() - t0)


@torch.inference_mode()
def hf_answers(model, eos, prompts, max_new, batch):
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out, tokens = {}, 0
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for start in range(0, len(order), batch):
        part = order[start:start + batch]
        width = max(len(prompts[i]) for i in part)
        ids = torch.full((len(part), width), 2, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(part):  # left padding
            ids[row, width - len(prompts[i]):], mask[row, width - len(prompts[i]):] = torch.tensor(prompts[i]), 1
        gen = model.generate(input_ids=ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=max_new,
                             do_sample=False, eos_token_id=sorted(eos), pad_token_id=2)[:, width:].tolist()
        for i, seq in zip(part, gen):
            cut = next((k for k, t in enumerate(seq) if t in eos), len(seq))
            out[i] = seq[:cut]
            tokens += cut
    torch.cuda.synchronize()
    return [out[i] for i in range(len(prompts))], tokens / (time.perf_counter() - t0)


@torch.inference_mode()
def step_ms(model, slots, context, reps=20):
    d = SlotDecoder(model, slots, 2048)
    d.pos.copy_(torch.randint(0, context, (slots,)))
    d.step(context, Sampling())  # captures the graph
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        d.step(context, Sampling())
    torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) / reps * 1e3
    del d
    torch.cuda.empty_cache()
    return ms


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--prompts", type=Path, required=True)
    p.add_argument("--template", type=Path, default=Path("configs/templates/smollm2-thinking.jinja"))
    p.add_argument("--count", type=int, default=1024, help="prompts of the side-by-side throughput run")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    report = {"card": torch.cuda.get_device_name()}

    def say(key, value):
        report[key] = value
        print(f"{key}: {value}", flush=True)
        args.out.write_text(json.dumps(report, indent=1))

    records = [r for _, r in zip(range(args.count), (rec for _, rec in iter_jsonl(args.prompts)))]
    for dtype in (torch.float32, torch.bfloat16):
        model, tok = load_model(args.model, dtype, "cuda")
        renderer = Renderer(tok, args.template.read_text())
        eos = eos_ids(model, tok)
        prompts = [renderer.ids(renderer.text(first_turn(r), {"thinking_mode": "adaptive"})) for r in records]
        name = str(dtype).split(".")[1]
        ours, _ = engine_answers(model, eos, prompts[:12], 96, slots=8)
        ref, _ = hf_answers(model, eos, prompts[:12], 96, batch=1)
        say(f"{name}_equal_answers_of_12", sum(a == b for a, b in zip(ours, ref)))
        if dtype == torch.bfloat16:
            for slots in (256, 512, 1024):
                for context in (512, 2048):
                    ms = step_ms(model, slots, context)
                    say(f"step_ms_slots{slots}_context{context}", round(ms, 3))
            ref, hf_rate = hf_answers(model, eos, prompts, 256, batch=512)
            ours, rate = engine_answers(model, eos, prompts, 256, slots=512)
            say("hf_generate_answer_tokens_per_s", round(hf_rate))
            say("engine_answer_tokens_per_s", round(rate))
            say("engine_over_hf", round(rate / hf_rate, 2))
            say(f"bf16_engine_equal_to_hf_batched_of_{len(prompts)}", sum(a == b for a, b in zip(ours, ref)))
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
