"""On CUDA: the online target's forward is queued behind the training step without the host waiting for the GPU,
so the host can prepare the next micro-batch while the card still runs the current step (data.online.prefetch)."""
from __future__ import annotations

import time

import pytest
import torch

from dflashkit.train.online import TargetFeatures

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def small_target():
    """A random SmolLM2-shaped Llama, 4 layers: its forward's launches are what is timed, not its weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=9,
                         num_key_value_heads=3, head_dim=64, vocab_size=49152, max_position_embeddings=4096)
    return LlamaForCausalLM(config)


def pinned_batch(lengths: list[int], width: int) -> dict:
    """A collated micro-batch as the loader hands it over: pinned ids, the packed positions' flat index."""
    ids = torch.randint(0, 49152, (len(lengths), width)).pin_memory()
    index = torch.cat([row * width + torch.arange(n) for row, n in enumerate(lengths)]).pin_memory()
    return {"input_ids": ids, "token_index": index}


# a forward per length group; one for the whole micro-batch; the same replayed as CUDA graphs
@pytest.mark.parametrize("forward_cost, cuda_graphs", [(0, False), (10**9, False), (10**9, True)])
def test_the_online_forward_is_queued_behind_a_busy_gpu_without_waiting(forward_cost, cuda_graphs):
    device = torch.device("cuda")
    target = TargetFeatures(small_target(), {"target_layer_ids": [0, 2, 3]}, device, torch.bfloat16,
                            with_final=True, forward_cost=forward_cost, cuda_graphs=cuda_graphs)
    batch = pinned_batch([512, 300, 77, 512, 128, 64, 400, 200], 512)
    target(batch)  # warm-up: kernels, cuBLAS handles
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    torch.cuda._sleep(2_000_000_000)  # the training step still running on the main stream (~1 s of GPU spin)
    side.wait_stream(torch.cuda.current_stream())  # as Prefetched queues the forward
    t0 = time.perf_counter()
    with torch.cuda.stream(side):
        out = target(batch)
    queued = time.perf_counter() - t0
    torch.cuda.synchronize()
    done = time.perf_counter() - t0
    assert out["aux_hidden_states"].shape == (sum([512, 300, 77, 512, 128, 64, 400, 200]), 3 * 576)
    assert queued < 0.3 * done, f"the host waited for the GPU: {queued:.3f} s to queue, {done:.3f} s to run"


def eager_and_graphed() -> tuple[TargetFeatures, TargetFeatures]:
    """The same random target twice, one forward a micro-batch: eager, and replayed as CUDA graphs."""
    device = torch.device("cuda")
    torch.manual_seed(0)
    model, meta = small_target(), {"target_layer_ids": [0, 2, 3]}
    return tuple(TargetFeatures(model, meta, device, torch.bfloat16, with_final=True, forward_cost=10**9,
                                cuda_graphs=graphs) for graphs in (False, True))


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()


def test_cuda_graphs_give_the_eager_states_over_shapes_in_any_order():
    """Graphs of three padded shapes share one memory pool and replay in an order unlike their capture's; each
    micro-batch's packed states match the eager forward's (bf16, different padded shapes: not bitwise)."""
    eager, graphed = eager_and_graphed()
    shapes = [[512, 300, 77], [100, 90], [1000, 20, 600, 3], [512, 300, 77], [1000, 20, 600, 3], [100, 90]]
    for lengths in shapes:
        batch = pinned_batch(lengths, max(lengths))
        want, got = eager(batch), graphed(batch)
        for key in ("aux_hidden_states", "hidden_states"):
            assert got[key].shape == want[key].shape
            assert relative_error(got[key], want[key]) < 2e-2, (lengths, key)
    assert len(graphed.forward.graphs) == 3


def test_cuda_graph_replays_on_two_streams_do_not_overwrite_each_other():
    """The held-out pass prefetches on its own stream while training's forwards may still be queued on another: two
    micro-batches of one padded shape (one graph, one set of buffers) on two streams, the first held back by a busy
    GPU, each get their own states."""
    eager, graphed = eager_and_graphed()
    first, second = pinned_batch([512, 300, 77], 512), pinned_batch([500, 20, 10], 512)
    graphed(first)  # captured
    torch.cuda.synchronize()
    streams = torch.cuda.Stream(), torch.cuda.Stream()
    with torch.cuda.stream(streams[0]):
        torch.cuda._sleep(500_000_000)
        got_first = graphed(first)
    with torch.cuda.stream(streams[1]):
        got_second = graphed(second)
    torch.cuda.synchronize()
    for got, batch in ((got_first, first), (got_second, second)):
        assert relative_error(got["aux_hidden_states"], eager(batch)["aux_hidden_states"]) < 2e-2
