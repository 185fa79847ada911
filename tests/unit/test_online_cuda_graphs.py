"""data.online.cuda_graphs: the forward runs at padded shapes (rows up to a power of two, length up to a multiple of
256). What the graphs rely on, checked on the CPU: the padding rows and positions, whatever ids they hold, leave the
real rows' states as they are. The capture and replay themselves: tests/gpu/test_online_target_async.py."""
from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from dflashkit.dump.hf_backend import HFBackend
from dflashkit.train.online import GraphedForward, TargetFeatures, padded_shape


def test_padded_shapes_are_few():
    step = GraphedForward.LENGTH_STEP
    assert padded_shape(32, 2048, step) == (32, 2048) and padded_shape(32, 1, step) == (32, 256)
    assert padded_shape(31, 257, step) == (32, 512) and padded_shape(1, 256, step) == (1, 256)
    assert padded_shape(5, 700, step) == (8, 768)
    assert len({padded_shape(32, n, step) for n in range(1, 2049)}) == 8  # the SmolLM2 recipe: 8 graphs at most


def test_padding_rows_and_positions_never_reach_the_real_ones():
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=300)
    backend = HFBackend(AutoModelForCausalLM.from_config(config), torch.float32, [0, 2], device="cpu")
    ids = torch.randint(1, 300, (3, 40))
    final, aux = backend.forward(ids)
    final, aux = final.clone(), aux.clone()  # the hook's tensor is the next forward's
    rows, length = padded_shape(3, 40, 16)
    padded = torch.randint(1, 300, (rows, length))  # stale ids from an earlier replay
    padded[:3, :40] = ids
    got_final, got_aux = backend.forward(padded)
    torch.testing.assert_close(got_aux[:3, :40], aux, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_final[:3, :40], final, rtol=1e-5, atol=1e-5)


def test_on_the_cpu_the_eager_forward_runs():
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=300)
    target = TargetFeatures(AutoModelForCausalLM.from_config(config), {"target_layer_ids": [0, 1]},
                            torch.device("cpu"), torch.float32, with_final=True, forward_cost=0, cuda_graphs=True)
    assert target.forward == target.backend.forward
