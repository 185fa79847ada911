"""How much of what a micro-batch computes is padding, with and without `data.group_by_length` (CPU, seconds).

    python bench/batch_padding.py --records sharegpt.jsonl --tokenizer MODEL_DIR [--micro-batch 32] [--windows 0 4 16]
    python bench/batch_padding.py --answers bench/data/smollm2-*-answers*.jsonl.xz
    python bench/batch_padding.py --records sharegpt.jsonl --tokenizer MODEL_DIR --turns 2 --windows 0 --forward-costs 65536 8192 4096

Reads the first --count conversations of a .jsonl (generate records, or ShareGPT / OpenAI layout) that start with a
user turn, and tokenizes each whole conversation, as training does (--turns 2: its first turn and reply only, as
bench/online_vs_offline.py's records), with the tokenizer's chat template (cut at --max-seq-len). For each K
of --windows it lays out one epoch's micro-batches as the trainer does (`dflashkit.train.data.BatchPlan`, K = 0:
ungrouped), the records sized by their token counts (what the online source reads from a generate record's counts,
and what a dump record's bytes follow) and by their line's bytes (the online source's fallback for records without
counts). Prints one JSON line per K and size: the real share of the
positions a forward cut to each micro-batch's longest row computes (`real_of_longest`: the online target's forward)
and of the power-of-two padded length the draft sees (`real_of_padded`). --answers reads the lengths the generation
recorded in packed answers files instead (no tokenizer; the sizes the online source reads). --forward-costs C ...
adds, per C, the share when each micro-batch's rows run in the online target's length groups (one forward each),
eager and under data.online.cuda_graphs.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from online_vs_offline import replied_conversations  # bench/: its records' reader

from dflashkit.train.data import BatchPlan, padded_length


def records(path: Path, count: int, tokenizer, max_seq_len: int, turns: int) -> tuple[list[int], list[int]]:
    """(token lengths, line bytes) of the first `count` conversations that start with a user turn and a reply."""
    lengths, sizes = [], []
    for raw, conversation in replied_conversations(path):
        kept = conversation[:turns] if turns else conversation
        messages = [{"role": t.role, "content": t.content} for t in kept]
        ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        lengths.append(min(max_seq_len, len(ids)))
        # the line the online source would index: the raw one, or a generate record of the kept turns
        sizes.append(len(raw) if not turns else len(json.dumps({"messages": messages}, ensure_ascii=False).encode()))
        if len(lengths) == count:
            break
    return lengths, sizes


def shares(plan: BatchPlan, lengths: list[int]) -> dict:
    real = longest = padded = 0
    for mb in plan.micro_batches(0, 0, 0):
        rows = [lengths[i] for i, _ in mb]
        real += sum(rows)
        longest += len(rows) * max(rows)
        padded += len(rows) * padded_length(max(rows))
    return {"real_of_longest": round(real / longest, 3), "real_of_padded": round(real / padded, 3)}


def grouped_shares(plan: BatchPlan, lengths: list[int], forward_cost: int) -> dict:
    """The online forward's real share when each micro-batch's rows run in length groups at `forward_cost`
    (data.online.forward_cost_tokens): eager (each group cut to its longest row) and under CUDA graphs (the groups
    cut by, and run at, GraphedForward's padded shapes); forwards per micro-batch and the graphs' shapes."""
    from dflashkit.train.online import GraphedForward, length_groups

    micro_batches = [[lengths[i] for i, _ in mb] for mb in plan.micro_batches(0, 0, 0)]
    real = sum(map(sum, micro_batches))

    def cut_to_longest(rows: int, length: int) -> tuple[int, int]:  # an eager forward's shape
        return rows, length

    out, shapes = {"forward_cost": forward_cost}, {}
    for name, shape in (("groups", cut_to_longest), ("graphed_groups", GraphedForward.shape)):
        shapes[name] = [shape(len(g), max(rows[i] for i in g))
                        for rows in micro_batches for g in length_groups(rows, forward_cost, shape)]
        out[f"real_of_{name}"] = round(real / sum(r * n for r, n in shapes[name]), 3)
        out[f"{name}_forwards_per_micro_batch"] = round(len(shapes[name]) / len(micro_batches), 2)
    return out | {"graph_shapes": len(set(shapes["graphed_groups"]))}  # the CUDA graphs captured


def answered(paths: list[Path], max_seq_len: int) -> list[int]:
    """Token lengths of the conversations of packed answers files (bench/data), as their generation counted them."""
    from dflashkit.generate.answers import read_answers
    from dflashkit.train.online import record_size

    return [min(max_seq_len, record_size({"generation": {"turns": row["turns"]}}, b""))
            for path in paths for row in read_answers(path)[1].values() if row["turns"]]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--records", type=Path, help=".jsonl of conversations (with --tokenizer)")
    source.add_argument("--answers", type=Path, nargs="+",
                        help="packed answers files (bench/data): their recorded token counts, no tokenizer")
    p.add_argument("--tokenizer", help="model dir or tokenizer name (--records)")
    p.add_argument("--count", type=int, default=1280, help="--records: the first this many conversations")
    p.add_argument("--max-seq-len", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=32)
    p.add_argument("--windows", type=int, nargs="+", default=[0, 4, 16])
    p.add_argument("--turns", type=int, default=0, help="--records: the first N turns of each conversation (0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--forward-costs", type=int, nargs="*", default=[],
                   help="also the online forward's share in length groups at each data.online.forward_cost_tokens, "
                        "eager and under CUDA graphs")
    args = p.parse_args(argv)
    if args.records:
        if not args.tokenizer:
            p.error("--records needs --tokenizer")
        from transformers import AutoTokenizer

        lengths, sizes = records(args.records, args.count, AutoTokenizer.from_pretrained(args.tokenizer),
                                 args.max_seq_len, args.turns)
        proxies = {"token counts": lengths, "line bytes": sizes}
    else:
        lengths = answered(args.answers, args.max_seq_len)
        proxies = {"token counts": lengths}
    for k in args.windows:
        for proxy, by in proxies.items() if k else [(None, None)]:  # ungrouped: no size is read
            plan = BatchPlan(len(lengths), 1, args.micro_batch, 1, args.seed, k, by)
            row = {"group_by_length": k, "sized_by": proxy, "records": len(lengths),
                   "turns": "all" if args.answers or not args.turns else args.turns, "micro_batch": args.micro_batch}
            print(json.dumps({**row, **shares(plan, lengths)}), flush=True)
            for cost in args.forward_costs:
                print(json.dumps({**row, **grouped_shares(plan, lengths, cost)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
