"""The layer-id convention and the norm of the final state, checked on the real SmolLM2 against forward hooks:
DFlash id k = output of decoder layer k = HF hidden_states[k+1]; HF's last entry is normed, our final state is not."""
import pytest
import torch

from dflashkit.dump.hf_backend import HFBackend, decoder_layers
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
