"""A GPU stand-in for `server_generate.py` where no vLLM exists: a slot-based KV cache, CUDA-graph decoding and
continuous batching over a transformers Llama-family model, writing the generate stage's output (docs/FORMATS.md).

    python -m dflashkit.generate.engine --model DIR --input prompts.jsonl --output-dir OUT --dtype bfloat16 \
        --max-tokens 256 --slots 512

Each of `--slots` sequences owns one row of a static KV cache of `--max-context` positions. A decode step advances
every slot by one token; it is captured once per context bucket (the longest live sequence rounded up to `--bucket`)
as a CUDA graph, so a step is a single replay. A slot whose answer ends is refilled from the queue at the next refill
(prefills are batched, done when a slot in sixteen is free), not when the whole batch ends. Conversations are answered
turn by turn like `server_generate.py`: turn k's prompt is the chat template rendered over the turns before it, the
model's own earlier answers included. Only the decoder's attention is ours; embeddings, norms, rotary tables and MLPs
are the transformers modules themselves, so the unit test can hold this loop to `generate()` token for token in
float32. Needs only torch and transformers.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..formats import (
    ASSISTANT,
    SYSTEM,
    USER,
    BadRecord,
    Turn,
    normalize_conversation,
    to_output_messages,
)
from ..io import JsonlAppender, atomic_write_json
from ..shards import ShardFiles
from .synth import (
    SynthPaths,
    add_engine_arguments,
    make_filter,
    of_sample,
    prompt_record,
    read_openers,
    shard_target,
    user_header,
    write_done,
)

log = logging.getLogger("dflashkit.generate.engine")

SUPPORTED = ("LlamaForCausalLM",)  # what the decoder below mirrors: q/k/v/o projections, rotary, no q/k norms


@dataclasses.dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0


def pick(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """Next tokens from [N, V] logits: argmax, or a top-p sample (an exponential race, so it can run in a graph)."""
    if sampling.temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / sampling.temperature, -1)
    if sampling.top_p < 1:
        sorted_p, order = probs.sort(-1, descending=True)
        outside = sorted_p.cumsum(-1) - sorted_p > sampling.top_p  # keep the smallest head whose mass reaches top_p
        probs = probs.scatter(-1, order, sorted_p.masked_fill(outside, 0))
    return (probs / torch.empty_like(probs).exponential_()).argmax(-1)


class SlotDecoder:
    """The target with a KV cache of `slots` rows x `max_context` positions: batched prefill into chosen slots, and a
    one-token decode step of all slots (graph-captured per context bucket on CUDA)."""

    def __init__(self, model, slots: int, max_context: int, bucket: int = 256, graphs: bool | None = None):
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        arch = (model.config.architectures or [type(model).__name__])[0]
        if arch not in SUPPORTED:
            raise ValueError(f"the engine supports {', '.join(SUPPORTED)}, not {arch}")
        self.rope = apply_rotary_pos_emb
        self.model, self.base = model, model.model
        cfg = model.config
        self.slots, self.max_context, self.bucket = slots, max_context, bucket
        self.kv_heads, self.heads = cfg.num_key_value_heads, cfg.num_attention_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        dev, dtype = model.device, model.dtype
        shape = (len(self.base.layers), slots, self.kv_heads, max_context, self.head_dim)
        self.k_cache = torch.zeros(shape, dtype=dtype, device=dev)
        self.v_cache = torch.zeros(shape, dtype=dtype, device=dev)
        positions = torch.arange(max_context, device=dev)
        cos, sin = self.base.rotary_emb(self.k_cache[0, 0, 0, :1], positions[None])  # the tables HF's forward uses
        self.cos, self.sin = cos[0], sin[0]
        self.positions = positions
        self.rows = torch.arange(slots, device=dev)
        # The decode step's static inputs and output: each slot's last token and its position.
        self.tokens = torch.zeros(slots, dtype=torch.long, device=dev)
        self.pos = torch.zeros(slots, dtype=torch.long, device=dev)
        self.next = torch.zeros(slots, dtype=torch.long, device=dev)
        self.graphs_on = dev.type == "cuda" if graphs is None else graphs
        self.graphs: dict[tuple[int, Sampling], torch.cuda.CUDAGraph] = {}
        self.pool = None

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(self.base.norm(h))

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]], slots: list[int], sampling: Sampling) -> torch.Tensor:
        """Run whole prompts (right-padded: causal attention never sees the padding) into the given slots' cache rows;
        returns the first answer token of each."""
        n, width = len(prompts), max(map(len, prompts))
        dev = self.k_cache.device
        ids = torch.zeros(n, width, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, :len(p)] = torch.tensor(p)
        ids = ids.to(dev)
        rows = torch.tensor(slots, device=dev)
        cos, sin = self.cos[:width][None], self.sin[:width][None]
        h = self.base.embed_tokens(ids)
        for layer, (k_cache, v_cache) in enumerate(zip(self.k_cache, self.v_cache)):
            block = self.base.layers[layer]
            attn = block.self_attn
            x = block.input_layernorm(h)
            q = attn.q_proj(x).view(n, width, self.heads, self.head_dim).transpose(1, 2)
            k = attn.k_proj(x).view(n, width, self.kv_heads, self.head_dim).transpose(1, 2)
            v = attn.v_proj(x).view(n, width, self.kv_heads, self.head_dim).transpose(1, 2)
            q, k = self.rope(q, k, cos, sin)
            k_cache[rows, :, :width] = k
            v_cache[rows, :, :width] = v
            # K/V repeated per query head: plain causal attention, which the flash kernel takes.
            k, v = (t.repeat_interleave(self.heads // self.kv_heads, dim=1) for t in (k, v))
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=attn.scaling)
            h = h + attn.o_proj(o.transpose(1, 2).reshape(n, width, -1))
            h = h + block.mlp(block.post_attention_layernorm(h))
        last = torch.tensor([len(p) - 1 for p in prompts], device=dev)
        return pick(self._logits(h[torch.arange(n, device=dev), last]), sampling)

    def _step(self, context: int, sampling: Sampling) -> None:
        """One token for every slot: read self.tokens at self.pos, write their K/V there, attend over the first
        `context` positions of the slot's row, put the next token in self.next."""
        s, g = self.slots, self.heads // self.kv_heads
        cos, sin = self.cos[self.pos][:, None], self.sin[self.pos][:, None]
        # The query heads that share a K/V head ride as g query rows of one attention: no K/V copy for GQA.
        visible = (self.positions[:context][None] <= self.pos[:, None]).view(s, 1, 1, context)
        h = self.base.embed_tokens(self.tokens)[:, None]
        for layer, (k_cache, v_cache) in enumerate(zip(self.k_cache, self.v_cache)):
            block = self.base.layers[layer]
            attn = block.self_attn
            x = block.input_layernorm(h)
            q = attn.q_proj(x).view(s, self.kv_heads, g, self.head_dim)
            k = attn.k_proj(x).view(s, self.kv_heads, 1, self.head_dim)
            v = attn.v_proj(x).view(s, self.kv_heads, 1, self.head_dim)
            q, k = self.rope(q, k, cos, sin)
            k_cache[self.rows, :, self.pos] = k[:, :, 0]
            v_cache[self.rows, :, self.pos] = v[:, :, 0]
            o = F.scaled_dot_product_attention(q, k_cache[:, :, :context], v_cache[:, :, :context],
                                               attn_mask=visible, scale=attn.scaling)
            h = h + attn.o_proj(o.reshape(s, 1, -1))
            h = h + block.mlp(block.post_attention_layernorm(h))
        self.next.copy_(pick(self._logits(h[:, 0]), sampling))

    @torch.inference_mode()
    def step(self, context: int, sampling: Sampling) -> None:
        context = min(-(-context // self.bucket) * self.bucket, self.max_context)
        if not self.graphs_on:
            return self._step(context, sampling)
        key = (context, sampling)
        if key not in self.graphs:
            # Warm-up runs compute what the real step computes (same inputs), so they leave the cache as it was.
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._step(context, sampling)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self._step(context, sampling)
            self.pool = graph.pool()
            self.graphs[key] = graph
        self.graphs[key].replay()


@dataclasses.dataclass
class Request:
    key: Any
    prompt: list[int]
    max_tokens: int


class Engine:
    """Continuous batching over a SlotDecoder: `run` drains a queue of Requests, calling `on_done(request, tokens,
    finish_reason)` as each ends; `on_done` may append follow-up requests (the next turn) to the queue."""

    def __init__(self, decoder: SlotDecoder, eos: set[int], sampling: Sampling = Sampling(),
                 prefill_tokens: int = 65536):
        self.decoder, self.eos, self.sampling = decoder, np.array(sorted(eos)), sampling
        self.prefill_tokens = prefill_tokens
        self.answer_tokens = 0

    def run(self, queue: collections.deque, on_done: Callable[[Request, list[int], str], None]) -> None:
        d = self.decoder
        slots = d.slots
        live: list[Request | None] = [None] * slots
        free = list(range(slots - 1, -1, -1))
        pos = np.zeros(slots, dtype=np.int64)  # position of each slot's last token (the one the step reads)
        length = np.zeros(slots, dtype=np.int64)  # answer tokens so far
        budget = np.zeros(slots, dtype=np.int64)
        answer = np.zeros((slots, max(1, max((r.max_tokens for r in queue), default=1))), dtype=np.int64)

        def finish(slot: int, reason: str) -> None:
            n = int(length[slot]) - (reason == "stop")  # the end-of-turn token is not part of the answer
            request, live[slot] = live[slot], None
            free.append(slot)
            pos[slot] = length[slot] = 0
            self.answer_tokens += n
            on_done(request, answer[slot, :n].tolist(), reason)

        while queue or len(free) < slots:
            if queue and (len(free) >= max(1, slots // 16) or len(free) == slots):
                taken = []
                while queue and len(taken) < len(free):
                    request = queue.popleft()
                    if len(request.prompt) >= d.max_context or request.max_tokens < 1:
                        on_done(request, [], "too_long")
                        continue
                    taken.append(request)
                taken.sort(key=lambda r: len(r.prompt))
                while taken:  # prefill chunks of similar length, each within the token budget
                    chunk = [taken.pop(0)]
                    while taken and len(taken[0].prompt) * (len(chunk) + 1) <= self.prefill_tokens:
                        chunk.append(taken.pop(0))
                    rows = [free.pop() for _ in chunk]
                    first = d.prefill([r.prompt for r in chunk], rows, self.sampling).cpu().numpy()
                    for row, request, token in zip(rows, chunk, first):
                        live[row] = request
                        answer = _fit(answer, request.max_tokens)
                        answer[row, 0], length[row] = token, 1
                        pos[row] = len(request.prompt)
                        budget[row] = min(request.max_tokens, d.max_context - len(request.prompt))
                        if token in self.eos:
                            finish(row, "stop")
                        elif budget[row] <= 1:
                            finish(row, "length")
                        else:
                            d.tokens[row] = int(token)
            if len(free) == slots:
                continue
            d.pos.copy_(torch.from_numpy(pos), non_blocking=False)
            d.step(int(pos.max()) + 1, self.sampling)
            tokens = d.next.cpu().numpy()
            d.tokens.copy_(d.next)
            rows = np.array([i for i in range(slots) if live[i] is not None])
            answer[rows, length[rows]] = tokens[rows]
            length[rows] += 1
            pos[rows] += 1
            stopped = np.isin(tokens[rows], self.eos)
            for row, stop in zip(rows.tolist(), stopped.tolist()):
                if stop:
                    finish(row, "stop")
                elif length[row] >= budget[row]:
                    finish(row, "length")


def _fit(answer: np.ndarray, width: int) -> np.ndarray:
    if answer.shape[1] >= width:
        return answer
    grown = np.zeros((answer.shape[0], width), dtype=answer.dtype)
    grown[:, :answer.shape[1]] = answer
    return grown


class Renderer:
    """The chat template and tokenizer as the server applies them: render the conversation so far with the
    generation prompt, tokenize without adding special tokens."""

    def __init__(self, tokenizer, template: str | None):
        self.tokenizer, self.template = tokenizer, template

    def text(self, messages: list[dict], kwargs: dict, generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(messages, chat_template=self.template, tokenize=False,
                                                  add_generation_prompt=generation_prompt, **kwargs)

    def ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


@dataclasses.dataclass
class Conversation:
    """One conversation being regenerated: the prompt skeleton, the turns so far, per-turn stats."""
    rec: Any  # inputs.InputRecord
    skeleton: list[Turn]
    repairs: list[str]
    mode: str | None
    kwargs: dict
    turns: list[Turn] = dataclasses.field(default_factory=list)
    stats: list[dict] = dataclasses.field(default_factory=list)
    next_turn: int = 0

    def advance(self) -> bool:
        """Append turns up to the next user turn; False when the skeleton is used up."""
        while self.next_turn < len(self.skeleton):
            turn = self.skeleton[self.next_turn]
            self.next_turn += 1
            self.turns.append(turn)
            if turn.role == USER:
                return True
        return False


def conversation_record(c: Conversation, model: str, dtype: str) -> dict:
    """The generate stage's output record (docs/FORMATS.md), plus the dtype the answers were generated in."""
    out = {k: v for k, v in c.rec.record.items() if k not in ("messages", "conversations")}
    if "id" in out and out["id"] != c.rec.id:
        out["source_id"] = out["id"]
    out["id"] = c.rec.id
    out["messages"] = to_output_messages(c.turns, "oai")
    out["thinking_mode"] = c.mode
    out["generation"] = {"model": model, "chat_template_kwargs": c.kwargs, "turns": c.stats,
                         "truncated": any(s["finish_reason"] == "length" for s in c.stats), "repairs": c.repairs,
                         "index": c.rec.index, "dtype": dtype}
    return out


def answer_conversations(engine: Engine, renderer: Renderer, conversations: list[Conversation], max_tokens: int,
                         write: Callable[[Conversation], None], fail: Callable[[Conversation, str], None]) -> None:
    """Answer every user turn of every conversation, turn by turn; `write` gets each finished conversation, `fail`
    one whose first prompt is over the context (with the reason), as the server would refuse it."""

    def request(c: Conversation) -> Request:
        messages = [{"role": t.role, "content": t.content} for t in c.turns]
        return Request(c, renderer.ids(renderer.text(messages, c.kwargs)), max_tokens)

    def on_done(req: Request, tokens: list[int], reason: str) -> None:
        c = req.key
        if reason == "too_long" and not c.stats:
            return fail(c, f"the first prompt ({len(req.prompt)} tokens) is over --max-context")
        if reason == "too_long":  # the server would refuse the request: the conversation ends before this turn
            c.turns.pop()
            c.repairs.append(f"user turns from {len(c.stats) + 1} on dropped: the prompt is over the context")
        else:
            c.turns.append(Turn(ASSISTANT, renderer.decode(tokens)))
            # Counted as vLLM counts them: the end-of-turn token is a completion token.
            c.stats.append({"finish_reason": reason, "prompt_tokens": len(req.prompt),
                            "completion_tokens": len(tokens) + (reason == "stop")})
            if c.advance():
                queue.appendleft(request(c))  # the next turn goes first: its conversation finishes sooner
                return
        write(c)

    queue: collections.deque = collections.deque()
    for c in conversations:
        if c.advance():
            queue.append(request(c))
    engine.run(queue, on_done)


def load_model(path: str, dtype: torch.dtype, device: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    return model, AutoTokenizer.from_pretrained(path)


def eos_ids(model, tokenizer) -> set[int]:
    """The generation config's end tokens, as vLLM stops on them, plus the tokenizer's own."""
    eos = model.generation_config.eos_token_id if model.generation_config else None
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def read_conversations(args: argparse.Namespace, errors: JsonlAppender, already: set[str]
                       ) -> tuple[list[Conversation], int, int]:
    """This shard's conversations not `already` written, the number of input records the shard holds, and how many
    of those are `already` written (the file may hold others, e.g. from a run with a larger --max-conversations)."""
    from .inputs import iter_inputs, shard_of

    out, inputs, resumed = [], 0, 0
    for rec in iter_inputs(args.input):
        if args.max_conversations is not None and rec.index >= args.max_conversations:
            break
        if shard_of(rec.index, args.num_shards) != args.shard_id:
            continue
        inputs += 1
        if rec.id in already:
            resumed += 1
            continue
        try:
            if rec.error is not None:
                raise rec.error
            skeleton, repairs = normalize_conversation(rec.record)
        except BadRecord as e:
            errors.write({"id": rec.id, "index": rec.index, "source": rec.source, "stage": "generate",
                          "kind": "skipped", "reason": e.reason, "detail": e.detail})
            continue
        if args.system_prompt and skeleton[0].role != SYSTEM:
            skeleton.insert(0, Turn(SYSTEM, args.system_prompt))
        mode = args.thinking_modes[rec.index % len(args.thinking_modes)] if args.thinking_modes else None
        kwargs = dict(args.chat_template_kwargs, **({args.thinking_mode_key: mode} if mode else {}))
        out.append(Conversation(rec, skeleton, repairs, mode, kwargs))
    return out, inputs, resumed


def written_ids(path: Path) -> set[str]:
    """Ids already in a shard file, its torn last line (a killed run) cut first."""
    from ..io import iter_jsonl, repair_jsonl_tail

    if not path.exists():
        return set()
    repair_jsonl_tail(path)
    return {rec["id"] for _, rec in iter_jsonl(path)}


def synthesize(decoder, eos: set[int], renderer, args: argparse.Namespace, model: str) -> int:
    """--synthesize: every slot samples the user header's continuation; finished samples refill (the prompt
    filter, records and paths are synth.py's, shared with server_generate.py --synthesize)."""
    paths = SynthPaths.of(Path(args.output_dir), args.shard_id, args.num_shards)
    target = shard_target(args.synthesize, args.shard_id, args.num_shards)
    limit = int(target * args.synth_attempts)
    header = user_header(renderer.tokenizer, renderer.template, args.chat_template_kwargs)
    openers = read_openers(args.synth_openers)
    headers = [renderer.ids(header + o) for o in openers]
    engine = Engine(decoder, eos, Sampling(args.synth_temperature, args.synth_top_p))
    keep = make_filter(args, renderer.tokenizer)
    state = {"submitted": 0, "finished": 0, "accepted": 0}
    queue: collections.deque = collections.deque()

    def submit() -> None:
        sample = args.shard_id + state["submitted"] * args.num_shards
        state["submitted"] += 1
        queue.append(Request(sample, of_sample(headers, sample), args.synth_max_tokens))

    t0 = time.time()
    with JsonlAppender(paths.prompts, truncate=True) as sink:
        def on_done(req: Request, tokens: list[int], reason: str) -> None:
            state["finished"] += 1
            opener = of_sample(openers, req.key)
            text = keep.accept(opener + renderer.decode(tokens), reason)
            if text is not None and state["accepted"] < target:
                state["accepted"] += 1
                sink.write(prompt_record(args.seed, req.key, text, model, args.synth_temperature, args.synth_top_p,
                                         opener))
            pending = state["submitted"] - state["finished"]
            if state["accepted"] + pending < target and state["submitted"] < limit:
                submit()

        for _ in range(min(limit, target + decoder.slots)):
            submit()
        engine.run(queue, on_done)
    counts = {"accepted": state["accepted"], "samples": state["finished"], "rejected": dict(keep.rejected),
              "sample_tokens": engine.answer_tokens}
    if state["accepted"] < target:  # no marker: the shard is not done
        print(f"{paths.prompts.name}: only {state['accepted']} of {target} prompts: {counts}", file=sys.stderr)
        return 1
    write_done(paths, args, counts, time.time() - t0)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dflashkit.generate.engine", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="HF model folder (a Llama-family causal LM)")
    p.add_argument("--input", help="prompt records, as server_generate.py reads them")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--model-name", help="the name recorded in generation.model (default: --model)")
    p.add_argument("--chat-template", type=Path, help="a .jinja file (default: the tokenizer's own)")
    p.add_argument("--chat-template-kwargs", type=json.loads, default={})
    p.add_argument("--thinking-modes", type=lambda s: [m for m in s.split(",") if m], default=[])
    p.add_argument("--thinking-mode-key", default="thinking_mode")
    p.add_argument("--system-prompt", default=None)
    p.add_argument("--max-tokens", type=int, default=256, help="per answer (server_generate.py's --max-tokens)")
    p.add_argument("--max-conversations", type=int, default=None, help="read only the first N input records")
    p.add_argument("--dtype", choices=["bfloat16", "float32", "float16"], default="bfloat16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--slots", type=int, default=512, help="sequences decoded at once (rows of the KV cache)")
    p.add_argument("--max-context", type=int, default=2048, help="KV cache positions per slot: prompt + answer")
    p.add_argument("--bucket", type=int, default=256, help="context rounding of the captured decode steps")
    p.add_argument("--num-shards", type=int, default=1)
    p.add_argument("--shard-id", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    add_engine_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    p = build_parser()
    args = p.parse_args(argv)
    if not 0 <= args.shard_id < args.num_shards:
        p.error(f"--shard-id {args.shard_id} is outside [0, {args.num_shards})")
    if (args.input is None) == (args.synthesize is None):
        p.error("give --input (answer prompts) or --synthesize N (make prompts), not both")
    torch.manual_seed(args.seed)
    dtype = getattr(torch, args.dtype)
    model, tokenizer = load_model(args.model, dtype, args.device)
    renderer = Renderer(tokenizer, args.chat_template.read_text() if args.chat_template else None)
    name = args.model_name or args.model
    decoder = SlotDecoder(model, args.slots, args.max_context, args.bucket)
    if args.synthesize is not None:
        return synthesize(decoder, eos_ids(model, tokenizer), renderer, args, name)
    files = ShardFiles(Path(args.output_dir), args.shard_id, args.num_shards)
    done = files.done
    if done.exists():
        log.info("%s exists; nothing to do", done)
        return 0
    t0 = time.time()
    already = written_ids(files.records)  # a rerun answers only the rest, like server_generate.py
    if already:
        log.info("resuming: %d conversations already in %s", len(already), files.records)
    with JsonlAppender(files.errors, truncate=True) as errors, JsonlAppender(files.records) as sink:
        conversations, inputs, resumed = read_conversations(args, errors, already)
        engine = Engine(decoder, eos_ids(model, tokenizer))
        tokens = {"prompt": 0, "completion": 0}

        def write(c: Conversation) -> None:
            sink.write(conversation_record(c, name, args.dtype))
            tokens["prompt"] += sum(s["prompt_tokens"] for s in c.stats)
            tokens["completion"] += sum(s["completion_tokens"] for s in c.stats)

        failed = []

        def fail(c: Conversation, detail: str) -> None:
            failed.append(c)
            errors.write({"id": c.rec.id, "index": c.rec.index, "source": c.rec.source, "stage": "generate",
                          "kind": "error", "reason": "context_length", "detail": detail})

        answer_conversations(engine, renderer, conversations, args.max_tokens, write, fail)
    wall = time.time() - t0
    written = resumed + len(conversations) - len(failed)
    counts = {"input": inputs, "written": written, "skipped": inputs - written - len(failed), "errors": len(failed)}
    summary = {"counts": counts, "tokens": tokens, "answer_tokens": engine.answer_tokens,
               "answer_tokens_per_s": round(engine.answer_tokens / wall, 1)}
    atomic_write_json(done, {"stage": "generate", "shard_id": args.shard_id, "num_shards": args.num_shards,
                             **summary, "wall_time_s": round(wall, 3), "dtype": args.dtype,
                             "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                             "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    log.info("%s done in %.1f s: %s", files.name, wall, json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
