"""Training data for a real SmolLM2 run on a GPU machine that cannot download: the target from its GGUF file, and
greedy answers to prompts written in the generate stage's output format (docs/FORMATS.md), ready for the dump stage.

    python bench/train_smollm2_data.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf --tokenizer-dir TOK \
        --prompts sharegpt.jsonl mtbench.jsonl --num-prompts 2000 --model-out /tmp/smollm2 --out /tmp/gen.jsonl

With --num-shards N, process k answers prompts k, k+N, ... (one process per GPU; bench/quality_run.sh does this) and
records the global prompt index, the dump stage's shard key. Prompts are batched by length, so a batch of short
prompts is not padded to a long one.

The GGUF weights are dequantized (Q4_1) into a float32 HF folder, so this target is SmolLM2 after 4-bit rounding;
the draft is trained and judged against that same target. Stands in for `server_generate.py` where no vLLM exists.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch


def hf_from_gguf(gguf: Path, tokenizer_dir: Path, out: Path) -> None:
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model stays marked as quantized and refuses save_pretrained; its weights are dequantized already.
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    tied = config.get("tie_word_embeddings", False)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=1))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, out / name)


def user_turns(files: list[Path], limit: int, every_turn: bool = False) -> list[tuple[str, str, str]]:
    """(conversation id, prompt id, text) of the first user turn of each conversation, or of every user turn (each
    then answered on its own, without the turns before it); empty and over-long turns are skipped."""
    from dflashkit.formats import raw_turns

    out = []
    for file in files:
        with open(file, encoding="utf-8") as f:
            for n, line in enumerate(f):
                rec = json.loads(line)
                try:
                    turns = raw_turns(rec)
                except ValueError:
                    continue
                conversation = str(rec.get("id", f"{file.stem}-{n}"))
                users = [t.content for t in turns if t.role == "user"]
                for k, user in enumerate(users if every_turn else users[:1]):
                    if user.strip() and len(user) < 4000:
                        out.append((conversation, conversation if k == 0 else f"{conversation}-turn{k}", user))
                    if len(out) >= limit:
                        return out
    return out


def first_user_turns(files: list[Path], limit: int) -> list[tuple[str, str]]:
    return [(pid, text) for _, pid, text in user_turns(files, limit)]


def write_prompt_set(files: list[Path], out: Path, heldout_conversations: int, multi_turn: bool = False) -> int:
    """Prompt records for the quality run: every distinct user turn of all but the last `heldout_conversations`
    conversations, then the first turns of those last ones (the eval's held-out slice), whose texts nothing trains on.
    Each turn is a record of its own, or with `multi_turn` one record per conversation holds its distinct turns.
    Returns the number of training records: the run's N and the eval's --heldout-skip."""
    turns = user_turns(files, 10**9, every_turn=True)
    firsts = [turn for turn in turns if turn[1] == turn[0]]  # a first turn's prompt id is its conversation id
    tail = firsts[len(firsts) - heldout_conversations:]
    heldout = {conversation for conversation, _, _ in tail}
    seen, train = {text.strip() for _, _, text in tail}, []  # ShareGPT repeats prompts across conversations
    for conversation, pid, text in turns:
        if conversation not in heldout and text.strip() not in seen:
            seen.add(text.strip())
            train.append((conversation, pid, text))
    tail = [(pid, text) for _, pid, text in tail]
    if multi_turn:
        # One record per conversation holding its distinct user turns, each answered after the earlier ones (the
        # empty assistant turns only separate them; generate regenerates every reply); in conversation order.
        conversations: dict[str, list[str]] = {}
        for conversation, _, text in train:
            conversations.setdefault(conversation, []).append(text)
        records = [{"id": cid, "messages": [m for text in texts for m in (
            {"role": "user", "content": text}, {"role": "assistant", "content": ""})][:-1]}
            for cid, texts in conversations.items()]
    else:
        records = [{"id": pid, "messages": [{"role": "user", "content": text}]} for _, pid, text in train]
    with open(out, "w", encoding="utf-8") as f:
        for rec in records + [{"id": pid, "messages": [{"role": "user", "content": text}]} for pid, text in tail]:
            f.write(json.dumps(rec) + "\n")
    return len(records)


@torch.inference_mode()
def generate(model_dir: Path, template: str, prompts: list[tuple[int, str, str]], out: Path, max_new_tokens: int,
             batch_size: int, dtype: torch.dtype) -> None:
    """prompts: (global index, id, text)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dflashkit.io import JsonlAppender, safe_id

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    device = "cuda" if torch.cuda.is_available() else "cpu"  # CPU only to smoke-test this script
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    kwargs = {"thinking_mode": "adaptive"}
    end = tok.convert_tokens_to_ids("<|im_end|>")
    t0, tokens = time.time(), 0
    prompts = sorted(prompts, key=lambda p: len(p[2]))
    with JsonlAppender(out, truncate=True) as sink:
        for start in range(0, len(prompts), batch_size):
            part = prompts[start: start + batch_size]
            texts = [tok.apply_chat_template([{"role": "user", "content": p}], chat_template=template,
                                             add_generation_prompt=True, tokenize=False, **kwargs)
                     for _, _, p in part]
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=end,
                                 pad_token_id=tok.pad_token_id)[:, enc["input_ids"].shape[1]:]
            for (index, pid, prompt), ids in zip(part, gen.tolist()):
                finished = end in ids
                ids = ids[: ids.index(end)] if finished else ids
                tokens += len(ids)
                sink.write({"id": safe_id(pid), "messages": [{"role": "user", "content": prompt},
                                                             {"role": "assistant", "content": tok.decode(ids)}],
                            "thinking_mode": kwargs["thinking_mode"],
                            "generation": {"model": str(model_dir), "chat_template_kwargs": kwargs,
                                           "truncated": not finished, "index": index}})
    print(f"generated {len(prompts)} answers, {tokens} tokens in {time.time() - t0:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path)
    parser.add_argument("--tokenizer-dir", type=Path)
    parser.add_argument("--template", type=Path, default=Path("configs/templates/smollm2-thinking.jinja"))
    parser.add_argument("--prompts", type=Path, nargs="+", required=True)
    parser.add_argument("--num-prompts", type=int, default=2000)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--model-out", type=Path)
    parser.add_argument("--out", type=Path, help="answers (.jsonl); without it, only the model is converted")
    parser.add_argument("--write-prompts", type=Path, metavar="OUT",
                        help="only write a prompt set from --prompts: every distinct user turn, the first turns of "
                             "the last --heldout-conversations conversations last (see write_prompt_set)")
    parser.add_argument("--heldout-conversations", type=int, default=484)
    parser.add_argument("--multi-turn", action="store_true",
                        help="--write-prompts: one record per conversation, its distinct user turns in order")
    # float32 by default: the eval judges the draft against the float32 target, so its greedy answers are the labels
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--shard-id", type=int, default=0)
    parser.add_argument("--num-shards", type=int, default=1)
    args = parser.parse_args()
    if args.write_prompts:
        n = write_prompt_set(args.prompts, args.write_prompts, args.heldout_conversations, args.multi_turn)
        print(f"{args.write_prompts}: {n} training prompts (N), then {args.heldout_conversations} held out")
        return
    if not (args.gguf and args.tokenizer_dir and args.model_out):
        parser.error("--gguf, --tokenizer-dir and --model-out are required (all but with --write-prompts)")
    if not (args.model_out / "config.json").exists():
        hf_from_gguf(args.gguf, args.tokenizer_dir, args.model_out)
    if args.out:
        prompts = [(i, pid, text) for i, (pid, text) in enumerate(first_user_turns(args.prompts, args.num_prompts))
                   if i % args.num_shards == args.shard_id]
        generate(args.model_out, args.template.read_text(), prompts, args.out, args.max_new_tokens, args.batch_size,
                 getattr(torch, args.dtype))


if __name__ == "__main__":
    main()
