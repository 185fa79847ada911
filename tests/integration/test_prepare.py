"""`dflashkit prepare` built a usable model and prompt sets (runs on what CI's setup made; a rerun is a no-op)."""
import json

import pytest
from transformers import AutoConfig, AutoTokenizer

from dflashkit.generate.inputs import iter_inputs
from dflashkit.io import iter_jsonl
from dflashkit.prepare import prepare

pytestmark = pytest.mark.integration


def test_model_folder_keeps_dims_special_tokens_and_chat_template(prepared):
    cfg = AutoConfig.from_pretrained(prepared["model"])
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == (30, 576, 49152)
    assert getattr(cfg, "quantization_config", None) is None  # dequantized: plain float weights
    tok = AutoTokenizer.from_pretrained(prepared["model"])
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert tok.convert_tokens_to_ids("<|im_end|>") == cfg.eos_token_id
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_prompt_sets(prepared):
    mtbench = [r for _, r in iter_jsonl(prepared["mtbench"])]
    assert len(mtbench) == 80 and len({r["category"] for r in mtbench}) == 8
    assert all([m["role"] for m in r["messages"]] == ["user", "assistant"] * 2 for r in mtbench)
    sharegpt = [r for _, r in iter_jsonl(prepared["sharegpt"])]
    assert len(sharegpt) == 17671  # every record before the cut in the truncated file
    # Real, messy data: some ids repeat. The generate stage reports each repeat as duplicate_id instead of losing it.
    repeats = len(sharegpt) - len({r["id"] for r in sharegpt})
    reported = [r for r in iter_inputs(str(prepared["sharegpt"])) if r.error and r.error.reason == "duplicate_id"]
    assert repeats > 0 and len(reported) == repeats
    assert json.loads((prepared["sharegpt"].parent / "sharegpt.jsonl.done").read_text())["records"] == 17671


def test_prepare_is_idempotent(prepared):
    stamps = {k: p.stat().st_mtime_ns for k, p in prepared.items()}
    again = prepare()
    assert {k: p.stat().st_mtime_ns for k, p in again.items()} == stamps
