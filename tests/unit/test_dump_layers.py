"""The layer-id convention and the norm of the final state, checked on the real SmolLM2 against forward hooks:
DFlash id k = output of decoder layer k = HF hidden_states[k+1]; HF's last entry is normed, our final state is not."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM, Qwen3Config, Qwen3ForCausalLM

from dflashkit.dump.hf_backend import CAUSAL_SDPA, HFBackend, decoder_layers, use_causal_sdpa
from dflashkit.model.layers import default_target_layer_ids, hf_hidden_states_index, vllm_capture_id
from dflashkit.prepare import model_dir


@pytest.fixture(scope="module")
def run():
    backend = HFBackend(str(model_dir()), torch.float32, default_target_layer_ids(30, 5))
    layers = decoder_layers(backend.model)
    outputs: dict[int, torch.Tensor] = {}
    hooks = [layer.register_forward_hook(lambda m, i, o, k=k: outputs.__setitem__(k, o[0] if isinstance(o, tuple)
                                                                                    else o))
             for k, layer in enumerate(layers)]
    ids = list(range(100, 140))
    with torch.inference_mode():
        ref = backend.model(torch.tensor([ids]), output_hidden_states=True)
        (_, final, aux), = backend.hidden_states([("c", ids)])
    for h in hooks:
        h.remove()
    return backend, outputs, ref.hidden_states, final, aux


def test_hidden_states_index_is_decoder_layer_output(run):
    _, outputs, hs, _, _ = run
    n = len(outputs)
    assert len(hs) == n + 1
    for k in range(n - 1):
        assert torch.equal(hs[hf_hidden_states_index(k)][0], outputs[k][0]), k
    assert hf_hidden_states_index(5) == vllm_capture_id(5) == 6


def test_last_hf_entry_is_post_norm_and_our_final_state_is_pre_norm(run):
    backend, outputs, hs, final, _ = run
    last = outputs[len(outputs) - 1][0]
    assert torch.equal(final, last)
    assert torch.allclose(hs[-1][0], backend.model.model.norm(last))
    assert not torch.allclose(hs[-1][0], last, atol=1e-2)


def test_aux_concatenates_target_layers_in_id_order(run):
    backend, outputs, _, _, aux = run
    h = backend.model.config.hidden_size
    assert aux.shape == (40, len(backend.target_layer_ids) * h)
    for i, k in enumerate(backend.target_layer_ids):
        assert torch.equal(aux[:, i * h:(i + 1) * h], outputs[k][0]), k


class HostReads(TorchDispatchMode):
    """Counts the reads of a tensor's value on the host (`.item()`, `.all()` in an `if`): a GPU sync each on CUDA."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func._schema.name == "aten::_local_scalar_dense"
        return func(*args, **(kwargs or {}))


def test_the_backend_forward_reads_nothing_on_the_host_and_keeps_the_states():
    """The backend's causal SDPA (no mask built) gives the default SDPA path's states bitwise, in right-padded
    batches too, without the host read transformers' mask builder makes; a model with sliding-window layers keeps
    its own attention."""
    torch.manual_seed(0)
    reference = AutoModelForCausalLM.from_pretrained(str(model_dir()), dtype=torch.float32).eval()
    backend = HFBackend(str(model_dir()), torch.float32, default_target_layer_ids(30, 5))
    assert (reference.config._attn_implementation, backend.model.config._attn_implementation) == ("sdpa",
                                                                                                   CAUSAL_SDPA)
    ids = torch.randint(0, 49152, (3, 40))
    with torch.no_grad(), HostReads() as reads:
        _, aux = backend.forward(ids)
    assert reads.count == 0
    with torch.no_grad(), HostReads() as reads:
        states = reference(ids, output_hidden_states=True, use_cache=False, logits_to_keep=1).hidden_states
    assert reads.count >= 1  # the default path's read, which the backend avoids
    assert torch.equal(aux, torch.cat([states[hf_hidden_states_index(k)] for k in backend.target_layer_ids], -1))
    windowed = Qwen3ForCausalLM(Qwen3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=100,
                                            use_sliding_window=True, sliding_window=8, max_window_layers=0))
    assert not use_causal_sdpa(windowed) and windowed.config._attn_implementation == "sdpa"
