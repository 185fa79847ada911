"""data.online.cuda_graphs: the forward runs at padded shapes (rows up to a power of two, length up to a multiple of
256). What the graphs rely on, checked on the CPU: the padding rows and positions, whatever ids they hold, leave the
real rows' states as they are. The capture and replay themselves: tests/gpu/test_online_target_async.py."""
from __future__ import annotations

import itertools
import random

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from dflashkit.dump.hf_backend import HFBackend
from dflashkit.train.online import GraphedForward, TargetFeatures, length_groups, padded_shape


def test_padded_shapes_are_few():
    step = GraphedForward.LENGTH_STEP
    assert padded_shape(32, 2048, step) == (32, 2048) and padded_shape(32, 1, step) == (32, 256)
    assert padded_shape(31, 257, step) == (32, 512) and padded_shape(1, 256, step) == (1, 256)
    assert padded_shape(5, 700, step) == (8, 768)
    assert len({padded_shape(32, n, step) for n in range(1, 2049)}) == 8  # the SmolLM2 recipe: 8 graphs at most


def graphed_cost(lengths, groups, forward_cost):
    """What the split computes under CUDA graphs: each forward's padded tokens, plus forward_cost per forward."""
    return sum(forward_cost + rows * length for rows, length in
               (GraphedForward.shape(len(g), max(lengths[i] for i in g)) for g in groups))


def test_length_groups_under_graphs_are_cut_by_the_padded_shapes_tokens():
    """Split by the rows' own lengths, [512, 500] + [260, 250] saves padding; replayed at padded shapes the second
    group runs at 2 x 512 all the same, so under graphs the rows stay one forward."""
    lengths = [512, 500, 260, 250]
    assert length_groups(lengths, forward_cost=200) == [[0, 1], [2, 3]]
    assert length_groups(lengths, forward_cost=200, shape=GraphedForward.shape) == [[0, 1, 2, 3]]


def test_length_groups_under_graphs_are_the_cheapest_split():
    """Exact: no cut of the sorted rows into consecutive groups computes less under graphs (brute force over all)."""
    rng = random.Random(0)
    for _ in range(30):
        lengths = [rng.randint(1, 2048) for _ in range(rng.randint(1, 9))]
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        cost = rng.choice([0, 512, 4096])
        got = length_groups(lengths, cost, shape=GraphedForward.shape)
        assert sorted(i for g in got for i in g) == list(range(len(lengths)))
        assert all(lengths[g[0]] == max(lengths[i] for i in g) for g in got)  # the forward is cut to g[0]'s length
        cheapest = min(graphed_cost(lengths, [order[a:b] for a, b in zip((0, *cuts), (*cuts, len(order)))], cost)
                       for k in range(len(order)) for cuts in itertools.combinations(range(1, len(order)), k))
        assert graphed_cost(lengths, got, cost) == cheapest


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
