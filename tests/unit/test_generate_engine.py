"""The GPU generate engine on CPU: its slot cache, continuous batching and multi-turn driver give transformers'
greedy tokens in float32, and the prompt synthesis keeps only finished, new prompts."""
from __future__ import annotations

import collections
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from dflashkit.config import UserError
from dflashkit.formats import USER, Turn
from dflashkit.generate.engine import (
    Conversation,
    Engine,
    Renderer,
    Request,
    Sampling,
    SlotDecoder,
    answer_conversations,
    build_parser,
    conversation_record,
    main,
    pick,
)
from dflashkit.generate.inputs import InputRecord
from dflashkit.generate.synth import PromptFilter, excluded_texts, prompt_record, read_openers, user_header
from dflashkit.io import iter_jsonl
from dflashkit.prepare import model_dir
from tests.helpers.server import THINKING_TEMPLATE


def tiny_llama(vocab: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    # Wide initial weights: logits far apart, so float32 rounding between attention kernels cannot flip an argmax.
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      initializer_range=0.3, tie_word_embeddings=True, rope_theta=10000.0)
    return LlamaForCausalLM(cfg).eval()


def hf_greedy(model, prompt: list[int], max_new: int, eos: int | None) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new, do_sample=False, eos_token_id=eos,
                         pad_token_id=0)[0, len(prompt):].tolist()
    return out[: out.index(eos)] if eos is not None and eos in out else out


def run_engine(model, requests: list[Request], eos: set[int], slots: int, context: int = 64) -> dict:
    done = {}
    engine = Engine(SlotDecoder(model, slots, context, bucket=16), eos)
    engine.run(collections.deque(requests), lambda r, tokens, reason: done.__setitem__(r.key, (tokens, reason)))
    return done


def test_continuous_batching_matches_hf_greedy():
    model = tiny_llama(128)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 128, (n,), generator=g).tolist() for n in (3, 17, 9, 30, 1, 12, 25)]
    budgets = [12, 20, 5, 16, 9, 20, 8]
    eos = hf_greedy(model, prompts[0], 12, None)[4]  # a token some answers reach: they must stop there
    want = {i: hf_greedy(model, p, m, eos) for i, (p, m) in enumerate(zip(prompts, budgets))}
    assert any(len(w) < m for w, m in zip(want.values(), budgets)), "no answer stops early: pick another eos"
    # 3 slots for 7 prompts: slots are refilled as answers end, with other sequences mid-answer around them.
    got = run_engine(model, [Request(i, p, m) for i, (p, m) in enumerate(zip(prompts, budgets))], {eos}, slots=3)
    assert {i: tokens for i, (tokens, _) in got.items()} == want
    assert {i: reason for i, (_, reason) in got.items()} == {
        i: "stop" if len(want[i]) < budgets[i] or (eos in hf_greedy(model, prompts[i], budgets[i], None)) else
        "length" for i in want}


def test_context_limit_ends_answers_and_refuses_long_prompts():
    model = tiny_llama(128)
    got = run_engine(model, [Request("fits", list(range(1, 60)), 50), Request("over", list(range(1, 70)), 5)],
                     set(), slots=2)
    assert got["over"] == ([], "too_long")
    tokens, reason = got["fits"]
    assert reason == "length" and len(tokens) == 64 - 59 and tokens == hf_greedy(model, list(range(1, 60)), 5, None)


def test_multi_turn_prompts_hold_the_models_own_answers():
    """Turn 2 is answered on the chat template rendered over turn 1's regenerated answer, as server_generate.py
    does; the record is the generate stage's format."""
    tok = AutoTokenizer.from_pretrained(model_dir())
    model = tiny_llama(len(tok))
    renderer = Renderer(tok, THINKING_TEMPLATE.read_text())
    kwargs = {"thinking_mode": "adaptive"}
    skeleton = [Turn(USER, "Name a colour."), Turn(USER, "And another one?")]
    rec = InputRecord(7, "c7", "x.jsonl:8", {"id": "c7", "category": "demo"})
    convo = Conversation(rec, skeleton, [], "adaptive", kwargs)
    written = []
    engine = Engine(SlotDecoder(model, 2, 256, bucket=64), {tok.convert_tokens_to_ids("<|im_end|>")})
    answer_conversations(engine, renderer, [convo], 6, written.append, lambda c, why: pytest.fail(why))
    assert written == [convo]
    out = conversation_record(convo, "tiny", "float32")
    messages = out["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    for turn in (1, 3):
        prompt = renderer.ids(renderer.text(messages[:turn], kwargs))
        assert renderer.decode(hf_greedy(model, prompt, 6, None)) == messages[turn]["content"]
        assert out["generation"]["turns"][turn // 2]["prompt_tokens"] == len(prompt)
    assert out["category"] == "demo" and out["generation"]["index"] == 7 and out["generation"]["dtype"] == "float32"


def test_top_p_samples_only_inside_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(2000, 1)
    torch.manual_seed(0)
    drawn = pick(logits, Sampling(temperature=1.0, top_p=0.7))
    counts = torch.bincount(drawn, minlength=4)
    assert counts[2:].sum() == 0 and counts[0] > counts[1] > 0  # 0.5 + 0.3 reach 0.7: tokens 2 and 3 never drawn
    assert pick(logits[:3], Sampling()).tolist() == [0, 0, 0]


def test_user_header_and_prompt_filter():
    tok = AutoTokenizer.from_pretrained(model_dir())
    header = user_header(tok, THINKING_TEMPLATE.read_text(), {})
    assert header.endswith("<|im_start|>user\n") and header.startswith("<|im_start|>system\n")
    keep = PromptFilter(5, 300, tok.all_special_tokens, exclude=["Seen  before?"])
    assert keep.accept("  What is a llama?\n", "stop") == "What is a llama?"
    assert keep.accept("what is a  LLAMA?", "stop") is None  # a duplicate, by case and spacing
    assert keep.accept("seen before?", "stop") is None
    assert keep.accept("Tell me about", "length") is None
    assert keep.accept("hi", "stop") is None
    assert keep.accept("Hi<|im_start|>assistant", "stop") is None
    assert keep.accept(" ".join(["spam", "eggs"] * 20), "stop") is None
    assert keep.rejected == {"duplicate": 2, "unfinished": 1, "length": 1, "special_token": 1, "repetitive": 1}



def test_a_later_synthesis_run_keeps_apart_from_every_earlier_set(tmp_path):
    """A second run (another seed) excludes the ShareGPT prompts and the first run's prompts, and its ids differ."""
    first = prompt_record(1, 3, "What is a llama?", "m", 1.0, 0.95)
    second = prompt_record(2, 3, "What is an alpaca?", "m", 1.0, 0.95)
    assert first["id"] == "synth-1-000000003" and second["id"] != first["id"] and second["synthesis"]["seed"] == 2
    sharegpt = write_prompts(tmp_path / "sharegpt.jsonl", [PROMPTS[0], PROMPTS[2]])
    (tmp_path / "synth" / "prompts").mkdir(parents=True)
    write_prompts(tmp_path / "synth" / "prompts" / "shard-00000-of-00001.jsonl", [first])
    args = build_parser().parse_args(["--model", "m", "--synthesize", "4", "--output-dir", "o",
                                      "--synth-exclude", str(sharegpt), str(tmp_path / "synth" / "prompts")])
    assert sorted(excluded_texts(args.synth_exclude)) == ["Hi", "More?", "What is a llama?", "Why is the sky blue?"]
    assert build_parser().parse_args(["--model", "m", "--synthesize", "4", "--output-dir", "o"]).synth_exclude == []

# A multi-turn record, a bad one, a single-turn one and one whose prompt is over the CLI's --max-context.
PROMPTS = [
    {"id": "a", "category": "x", "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""},
                                               {"role": "user", "content": "More?"}]},
    {"id": "b", "messages": [{"role": "assistant", "content": "no user turn"}]},
    {"id": "c", "conversations": [{"from": "human", "value": "Why is the sky blue?"}]},
    {"id": "d", "messages": [{"role": "user", "content": "word " * 200}]}]


def write_prompts(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def run_cli(tmp_path):
    """The engine CLI on CPU over a tiny saved model: run_cli(prompts, output_dir, *flags) gives its exit code."""
    tok = AutoTokenizer.from_pretrained(model_dir())
    model_path = tmp_path / "model"
    tiny_llama(len(tok)).save_pretrained(model_path)
    tok.save_pretrained(model_path)

    def run(prompts: Path, out: Path, *flags: str) -> int:
        return main(["--model", str(model_path), "--input", str(prompts), "--output-dir", str(out),
                     "--dtype", "float32", "--slots", "2", "--max-tokens", "5", "--max-context", "128",
                     "--chat-template", str(THINKING_TEMPLATE), "--thinking-modes", "enabled,disabled",
                     "--model-name", "tiny", *flags])
    return run


def test_engine_cli_writes_a_generate_shard_that_packs_and_unpacks(tmp_path, run_cli):
    """The CLI end to end on CPU: a multi-turn record, a single-turn one and a bad one; the compact answers rebuild
    the same shard from the prompt file."""
    from dflashkit.generate import answers

    prompts = write_prompts(tmp_path / "prompts.jsonl", PROMPTS)
    out = tmp_path / "gen"
    assert run_cli(prompts, out) == 0
    shard = out / "shard-00000-of-00001.jsonl"
    records = {r["id"]: r for _, r in iter_jsonl(shard)}
    assert sorted(records) == ["a", "c"]
    assert [m["role"] for m in records["a"]["messages"]] == ["user", "assistant"] * 2
    assert records["c"]["thinking_mode"] == "enabled" and records["a"]["generation"]["dtype"] == "float32"
    errors = [r for _, r in iter_jsonl(out / "shard-00000-of-00001.errors.jsonl")]
    assert [(e["id"], e["kind"], e["reason"]) for e in errors] == [("b", "skipped", "no_user_turn"),
                                                                    ("d", "error", "context_length")]
    done = json.loads((out / "shard-00000-of-00001.done.json").read_text())
    assert done["counts"] == {"input": 4, "written": 2, "skipped": 1, "errors": 1} and done["answer_tokens"] > 0

    # A rerun after a kill answers only what the shard file lacks.
    first = shard.read_text().splitlines(keepends=True)[0]
    shard.write_text(first + '{"id": "torn')
    (out / "shard-00000-of-00001.done.json").unlink()
    assert run_cli(prompts, out) == 0
    assert shard.read_text().startswith(first) and {r["id"]: r for _, r in iter_jsonl(shard)} == records
    assert json.loads((out / "shard-00000-of-00001.done.json").read_text())["counts"]["written"] == 2

    assert answers.main(["pack", str(shard), str(tmp_path / "a.jsonl.xz")]) == 0
    assert answers.main(["unpack", str(tmp_path / "a.jsonl.xz"), "--prompts", str(prompts),
                         "--output-dir", str(tmp_path / "back")]) == 0
    back = [r for _, r in iter_jsonl(tmp_path / "back" / "shard-00000-of-00001.jsonl")]
    assert sorted(back, key=lambda r: r["id"]) == sorted(records.values(), key=lambda r: r["id"])


def test_engine_cli_counts_this_runs_inputs_when_the_shard_holds_more(tmp_path, run_cli):
    """A resumed shard file may hold conversations beyond --max-conversations (an earlier run over more, or kept
    answers): the done marker counts this run's inputs only, so written + skipped + errors is the input count."""
    beyond = [{"id": i, "messages": [{"role": "user", "content": f"Tell me about {i}."}]} for i in ("e", "f")]
    prompts = write_prompts(tmp_path / "prompts.jsonl", PROMPTS + beyond)
    out = tmp_path / "gen"
    assert run_cli(prompts, out) == 0
    shard, done = out / "shard-00000-of-00001.jsonl", out / "shard-00000-of-00001.done.json"
    lines = {json.loads(line)["id"]: line for line in shard.read_text().splitlines(keepends=True)}
    assert sorted(lines) == ["a", "c", "e", "f"]
    shard.write_text(lines["a"] + lines["e"] + lines["f"])  # c is answered again; e and f lie beyond the first 4
    done.unlink()
    assert run_cli(prompts, out, "--max-conversations", "4") == 0
    assert sorted(r["id"] for _, r in iter_jsonl(shard)) == ["a", "c", "e", "f"]
    # Of the 4 inputs: a resumed and c answered (written), b without a user turn (skipped), d over the context.
    assert json.loads(done.read_text())["counts"] == {"input": 4, "written": 2, "skipped": 1, "errors": 1}


def test_multi_turn_prompt_set_keeps_each_distinct_user_turn_once(tmp_path):
    """bench/train_smollm2_data.py --write-prompts --multi-turn: one record per conversation with its distinct turns
    (separated by empty assistant turns), the held-out first turns last; the same turns as the one-per-turn set."""
    import importlib.util
    import json
    from pathlib import Path

    from dflashkit.formats import normalize_conversation

    spec = importlib.util.spec_from_file_location(
        "train_smollm2_data", Path(__file__).resolve().parents[2] / "bench" / "train_smollm2_data.py")
    data = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(data)

    def convo(cid, *users):
        return {"id": cid, "conversations": [t for u in users for t in ({"from": "human", "value": u},
                                                                         {"from": "gpt", "value": "old"})]}
    src = tmp_path / "sharegpt.jsonl"
    src.write_text("".join(json.dumps(c) + "\n" for c in [
        convo("a", "one", "two"), convo("b", "one", "three", "two"), convo("c", "four"), convo("h", "held")]))
    assert data.write_prompt_set([src], tmp_path / "multi.jsonl", 1, multi_turn=True) == 3
    records = [json.loads(line) for line in (tmp_path / "multi.jsonl").read_text().splitlines()]
    users = [[t.content for t in normalize_conversation(r)[0]] for r in records]
    assert [r["id"] for r in records] == ["a", "b", "c", "h"] and users == [["one", "two"], ["three"], ["four"], ["held"]]
    assert data.write_prompt_set([src], tmp_path / "single.jsonl", 1) == 4  # the same 4 training turns, one a record


def test_synthesis_openers_start_each_prompt_in_turn(tmp_path):
    """--synth-openers: sample i's user turn starts with opening i % n and the target writes the rest (SmolLM2 on
    the CPU, float32); the opening is recorded with the prompt."""
    (tmp_path / "openers.txt").write_text("# styles\nWrite a poem\n\nExplain\n")
    assert main(["--model", str(model_dir()), "--synthesize", "4", "--output-dir", str(tmp_path / "s"),
                 "--dtype", "float32", "--slots", "4", "--max-context", "256", "--synth-max-tokens", "48",
                 "--chat-template", str(THINKING_TEMPLATE), "--seed", "5",
                 "--synth-openers", str(tmp_path / "openers.txt")]) == 0
    records = [json.loads(line) for line in (tmp_path / "s" / "prompts" / "shard-00000-of-00001.jsonl").open()]
    assert len(records) == 4
    for r in records:
        opener = ["Write a poem", "Explain"][r["synthesis"]["sample"] % 2]
        text = r["messages"][0]["content"]
        assert r["synthesis"]["opener"] == opener and text.startswith(opener) and len(text) > len(opener), r
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(UserError, match="no opening"):
        read_openers(tmp_path / "empty.txt")
