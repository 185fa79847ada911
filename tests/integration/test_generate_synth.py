"""Prompt synthesis through the server's completions endpoint (vLLM CPU, SmolLM2): server_generate.py --synthesize
makes distinct prompts from the target's user header, reproducibly, and the generate stage answers them."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dflashkit.io import iter_jsonl
from tests.helpers.server import THINKING_TEMPLATE

pytestmark = pytest.mark.integration

GENERATE = Path(__file__).resolve().parents[2] / "server_generate.py"


def generate(server, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OPENAI_API_KEY": server.api_key}
    return subprocess.run([sys.executable, str(GENERATE), "--model", server.model, "--base-url", f"{server.url}/v1",
                           "--no-progress", *args], check=False, env=env, capture_output=True, text=True, timeout=600)


def test_synthesized_prompts_are_distinct_reproducible_and_answerable(vllm_server, prepared, tmp_path):
    synth = ["--synthesize", "4", "--tokenizer", str(prepared["model"]), "--chat-template", str(THINKING_TEMPLATE),
             "--synth-max-tokens", "48", "--concurrency", "8", "--seed", "3", "--output-dir", str(tmp_path / "s")]
    res = generate(vllm_server, *synth)
    assert res.returncode == 0, res.stderr[-2000:]
    prompts = tmp_path / "s" / "prompts" / "shard-00000-of-00001.jsonl"
    records = [r for _, r in iter_jsonl(prompts)]
    texts = [r["messages"][0]["content"] for r in records]
    assert len(records) == 4 and len({t.casefold() for t in texts}) == 4
    assert all(t and t == t.strip() and "<|im_" not in t for t in texts)
    done = json.loads((tmp_path / "s" / "shard-00000-of-00001.done.json").read_text())
    assert done["stage"] == "synthesize" and done["counts"]["accepted"] == 4
    assert done["counts"]["samples"] == 4 + sum(done["counts"]["rejected"].values())

    (tmp_path / "s" / "shard-00000-of-00001.done.json").unlink()  # a rerun draws the same samples (seed + sample)
    assert generate(vllm_server, *synth).returncode == 0
    assert [r for _, r in iter_jsonl(prompts)] == records

    res = generate(vllm_server, "--input", str(tmp_path / "s" / "prompts"), "--output-dir", str(tmp_path / "g"),
                   "--max-tokens", "4", "--temperature", "0")
    assert res.returncode == 0, res.stderr[-2000:]
    answered = {r["id"]: r for _, r in iter_jsonl(tmp_path / "g" / "shard-00000-of-00001.jsonl")}
    assert sorted(answered) == sorted(r["id"] for r in records)
    assert all(r["messages"][0]["content"] in texts and r["synthesis"]["model"] == vllm_server.model
               for r in answered.values())


def test_synthesis_openers_through_the_server(vllm_server, prepared, tmp_path):
    """--synth-openers on the completions path: each prompt is its opening (sample i % n) and the served model's
    continuation, as on the GPU engine (tests/unit/test_generate_engine.py)."""
    (tmp_path / "openers.txt").write_text("Write a poem\nExplain\n")
    res = generate(vllm_server, "--synthesize", "2", "--tokenizer", str(prepared["model"]), "--chat-template",
                   str(THINKING_TEMPLATE), "--synth-max-tokens", "48", "--seed", "3", "--output-dir",
                   str(tmp_path / "s"), "--synth-openers", str(tmp_path / "openers.txt"))
    assert res.returncode == 0, res.stderr[-2000:]
    records = [r for _, r in iter_jsonl(tmp_path / "s" / "prompts" / "shard-00000-of-00001.jsonl")]
    assert len(records) == 2
    for r in records:
        opener = ["Write a poem", "Explain"][r["synthesis"]["sample"] % 2]
        assert r["synthesis"]["opener"] == opener and r["messages"][0]["content"].startswith(opener + " ")
