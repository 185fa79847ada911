"""Served tau against the anchor mean, for one draft (docs/TRAINING.md, "Why two taus").

Our loop answers each prompt greedily (tau = tokens per verify step, as vLLM counts it); then every anchor of that
answer is scored in one training-style pass (`SpeculativeDecoder.every_anchor_logits`) and walked as greedy serving
steps (`loss.served_walk`), which is what the trainer's held-out score does. Prints, per prompt and over all: the
loop's tau, the walk's tau and the mean acceptance length over every anchor (the trainer's old tau).

    python bench/served_tau.py --draft DRAFT --target MODEL --prompts sharegpt-prompts.jsonl --skip 16000 --count 12
"""
from __future__ import annotations

import argparse

import torch


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dflashkit.eval.prompts import load_prompts
    from dflashkit.eval.run import eos_token_ids
    from dflashkit.eval.spec import SpeculativeDecoder
    from dflashkit.export import load_draft
    from dflashkit.model.masks import block_labels
    from dflashkit.train.data import first_anchors
    from dflashkit.train.loss import accepted_per_block, served_walk

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draft", required=True)
    parser.add_argument("--target", required=True)
    parser.add_argument("--prompts", required=True, help="prompt records (.jsonl); the first user turn is asked")
    parser.add_argument("--skip", type=int, default=0, help="records to skip (those trained on)")
    parser.add_argument("--count", type=int, default=12)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.target)
    target = AutoModelForCausalLM.from_pretrained(args.target, dtype=torch.float32).to(args.device)
    decoder = SpeculativeDecoder(target, load_draft(args.draft).to(args.device))
    eos = eos_token_ids(target, tokenizer)
    totals = {"loop_steps": 0, "loop_tokens": 0, "walk_steps": 0, "walk_tokens": 0, "anchors": 0, "accepted": 0}
    for prompt in load_prompts(args.prompts, tokenizer, skip=args.skip, limit=args.count):
        g = decoder.generate(prompt.prompt_ids, args.max_new_tokens, eos_token_ids=eos)
        ids = torch.tensor(g.prompt_ids + g.output_ids)
        loss_mask = torch.zeros_like(ids)
        loss_mask[len(g.prompt_ids):] = 1  # the answer: every position the loop emitted
        anchors, valid = first_anchors(loss_mask, len(g.output_ids))
        logits = decoder.every_anchor_logits(ids.tolist(), anchors)
        # Position j of a block's labels is x[anchor + j]; its K drafts predict j = 1..K (DFlash K = B-1, DSpark K = B).
        labels, counted = block_labels(ids[None], loss_mask[None], anchors[None], valid[None], decoder.num_drafts + 1)
        correct = torch.zeros_like(counted)  # slot 0 is the anchor, given
        correct[..., 1:] = (logits.argmax(-1).cpu()[None] == labels[..., 1:]) & counted[..., 1:]
        accepted = accepted_per_block(correct)
        steps, tokens = served_walk(accepted, anchors[None], valid[None])
        n, acc = int(valid.sum()), int(accepted[valid[None]].sum())
        for key, value in zip(totals, (g.steps, sum(g.accepted) + g.steps, steps, tokens, n, acc)):
            totals[key] += value
        print(f"{prompt.id}: loop tau {(sum(g.accepted) + g.steps) / max(g.steps, 1):.3f} ({g.steps} steps) | "
              f"walk tau {tokens / max(steps, 1):.3f} ({steps} steps) | anchor mean {1 + acc / max(n, 1):.3f}",
              flush=True)
    t = totals
    print(f"all: loop tau {t['loop_tokens'] / t['loop_steps']:.3f} | walk tau {t['walk_tokens'] / t['walk_steps']:.3f} "
          f"| anchor mean {1 + t['accepted'] / t['anchors']:.3f} over {t['anchors']} anchors")


if __name__ == "__main__":
    main()
