"""data.online.compile_target: the target's forward under torch.compile (dynamic shapes) gives the eager forward's
states, the final state taken by the backend's hook included, over length groups of different shapes."""
from __future__ import annotations

import copy

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from dflashkit.train.online import TargetFeatures


def batch(lengths: list[int], vocab: int) -> dict:
    g = torch.Generator().manual_seed(0)
    t = max(lengths)
    ids = torch.zeros(len(lengths), t, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(1, vocab, (n,), generator=g)
    token_index = torch.cat([i * t + torch.arange(n) for i, n in enumerate(lengths)])
    return {"input_ids": ids, "token_index": token_index}


def test_compiled_target_gives_the_eager_states():
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=300, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(config)
    meta = {"target_layer_ids": [0, 2]}
    common = dict(meta=meta, device=torch.device("cpu"), dtype=torch.float32, with_final=True, forward_cost=0)
    eager = TargetFeatures(copy.deepcopy(model), **common)
    compiled = TargetFeatures(model, **common, compile=True)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    for lengths in ([9, 31, 17], [40, 5]):  # forward_cost 0: one forward per length, every one a new shape
        b = batch(lengths, config.vocab_size)
        want, got = eager(b), compiled(b)
        assert got["aux_hidden_states"].shape == (sum(lengths), 2 * config.hidden_size)
        for key in ("aux_hidden_states", "hidden_states"):
            torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-5)
    assert not torch.equal(want["hidden_states"], want["aux_hidden_states"][:, config.hidden_size:])  # final != layer 2
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the compiled side really ran compiled
