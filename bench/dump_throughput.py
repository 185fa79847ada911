#!/usr/bin/env python
"""Dump throughput, vLLM vs HF, side by side on the same conversations; bytes per token on disk.

Each backend is loaded once (load time reported apart), warmed up on one conversation, then timed over all of them
including writing the records. Conversations are random token ids of a fixed length: the cost of a prefill does not
depend on the text. On CPU run with few short conversations; absolute numbers only mean something on a GPU.

  python bench/dump_throughput.py --model $DFLASHKIT_CACHE/models/SmolLM2-135M-Instruct --num-conversations 8 --tokens 256
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import tempfile
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process engine: one process to time
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import torch
from transformers import AutoConfig

from dflashkit.dump.format import DTYPES, save_dump_record
from dflashkit.dump.plan import dump_bytes, human
from dflashkit.model.layers import default_target_layer_ids, hidden_size, num_hidden_layers


def time_backend(backend, items, out_dir) -> dict:
    list(backend.hidden_states(items[:1]))  # warm-up
    mask = None
    t0 = time.perf_counter()
    for cid, final, aux in backend.hidden_states(items):
        t = final.shape[0]
        if mask is None or mask.numel() != t:
            mask = torch.zeros(t, dtype=torch.uint8)
            mask[t // 2:] = 1
        save_dump_record(out_dir, {"input_ids": torch.tensor(dict(items)[cid]), "hidden_states": final,
                                   "aux_hidden_states": aux, "loss_mask": mask, "conversation_id": cid})
    wall = time.perf_counter() - t0
    tokens = sum(len(ids) for _, ids in items)
    disk = sum(os.path.getsize(os.path.join(out_dir, f)) for f in os.listdir(out_dir) if f.endswith(".pt"))
    return {"tokens": tokens, "wall_s": round(wall, 3), "tokens_per_s": round(tokens / wall, 1),
            "bytes_per_token": round(disk / tokens, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--num-conversations", type=int, default=8)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--num-draft-layers", type=int, default=5)
    p.add_argument("--backends", default="hf,vllm")
    args = p.parse_args()
    config = AutoConfig.from_pretrained(args.model)
    layers, width = num_hidden_layers(config), hidden_size(config)
    ids = default_target_layer_ids(layers, args.num_draft_layers)
    rng = random.Random(0)
    vocab = config.vocab_size
    items = [(f"c{i}", [rng.randrange(100, vocab) for _ in range(args.tokens)]) for i in range(args.num_conversations)]
    results = {}
    for name in args.backends.split(","):
        out = tempfile.mkdtemp(prefix=f"bench-dump-{name}-")
        t0 = time.perf_counter()
        if name == "hf":
            from dflashkit.dump.hf_backend import HFBackend

            backend = HFBackend(args.model, DTYPES[args.dtype], ids)
        else:
            from dflashkit.dump.vllm_backend import VLLMBackend

            backend = VLLMBackend(args.model, args.dtype, ids, layers, args.tokens, out, enforce_eager=True)
        load_s = time.perf_counter() - t0
        results[name] = {"load_s": round(load_s, 1), **time_backend(backend, items, out)}
        backend.close()
        shutil.rmtree(out, ignore_errors=True)
    if "hf" in results and "vllm" in results:
        results["vllm_over_hf"] = round(results["vllm"]["tokens_per_s"] / results["hf"]["tokens_per_s"], 2)
    results["predicted_bytes_per_token"] = dump_bytes(1, width, len(ids), args.dtype) - dump_bytes(0, width, len(ids),
                                                                                                   args.dtype)
    m3 = dump_bytes(8192, 6144, 5, "bfloat16")
    results["minimax_m3_bytes_per_8192_token_sample"] = m3
    print(json.dumps({"device": "cuda" if torch.cuda.is_available() else "cpu", "model": args.model,
                      "target_layer_ids": ids, **results}, indent=2))
    print(f"MiniMax-M3 (H 6144, 5 target layers + final, bf16): {human(m3)} per 8192-token sample")


if __name__ == "__main__":
    main()
