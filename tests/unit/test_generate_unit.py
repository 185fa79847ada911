import argparse
from collections import Counter
from types import SimpleNamespace

import pytest

from dflashkit.generate.client import SamplingConfig, reply_text
from dflashkit.generate.run import parse_args, template_kwargs_for, thinking_mode_of


def test_thinking_modes_split_evenly_over_the_global_index():
    modes = ["enabled", "disabled", "adaptive"]
    per_shard = [Counter(thinking_mode_of(i, modes) for i in range(300) if i % 4 == s) for s in range(4)]
    total = sum(per_shard, Counter())
    assert total == Counter({"enabled": 100, "disabled": 100, "adaptive": 100})
    assert thinking_mode_of(5, []) is None


def test_mode_value_map_and_extra_kwargs_merge():
    args = argparse.Namespace(chat_template_kwargs={"reasoning_effort": "high"}, thinking_mode_key="enable_thinking",
                              thinking_mode_map={"enabled": True, "disabled": False})
    assert template_kwargs_for("enabled", args) == {"reasoning_effort": "high", "enable_thinking": True}
    assert template_kwargs_for("disabled", args) == {"reasoning_effort": "high", "enable_thinking": False}
    assert template_kwargs_for(None, args) == {"reasoning_effort": "high"}


def test_separate_reasoning_is_wrapped_back_with_the_tags():
    cfg = SamplingConfig(model="m", think_open="<mm:think>", think_close="</mm:think>")
    message = SimpleNamespace(content="\n\nThe answer.", model_extra={"reasoning": " step 1\n"})
    assert reply_text(message, cfg) == "<mm:think>\nstep 1\n</mm:think>\n\nThe answer."
    plain = SimpleNamespace(content="<think>x</think>y", model_extra={"reasoning": None})
    assert reply_text(plain, cfg) == "<think>x</think>y"


def test_parse_args_shards_from_slurm(monkeypatch):
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "5")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MAX", "8")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "8")
    args = parse_args(["--input", "x", "--output-dir", "o", "--model", "m", "--base-url", "http://h/v1"])
    assert (args.shard_id, args.num_shards) == (4, 8)


@pytest.mark.parametrize("argv", [
    ["--shard-id", "3", "--num-shards", "3"],
    ["--shard-id", "1"],
    ["--thinking-modes", "enabled", "--thinking-mode-map", '{"disabled": false}'],
    ["--chat-template-kwargs", "[1]"],
    ["--concurrency", "0"],
])
def test_parse_args_rejects_inconsistent_flags(argv, monkeypatch):
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID", raising=False)
    with pytest.raises(SystemExit):
        parse_args(["--input", "x", "--output-dir", "o", "--model", "m", "--base-url", "http://h/v1", *argv])
