"""Transformers backend: the reference the vLLM dump is tested against, and fine for small models.

One forward pass per conversation with output_hidden_states. Target layer k is `hidden_states[k + 1]`; the final state
is the last decoder layer's output taken with a forward hook, because HF's `hidden_states[L]` is already normed.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator

import torch

from ..model.layers import hf_hidden_states_index

log = logging.getLogger("dflashkit.dump")


# SDPA's own causal kernel under another name, so transformers builds no mask for it. For a forward without a cache
# or a mask (ours), its mask builder checks the position ids for packed sequences with a host read of a device
# tensor: a GPU sync every forward, which would make online training's target forward, queued ahead on a side
# stream, wait for the training step before it. Where every layer is plain causal attention the mask it builds is
# None anyway, so the states are the same (bitwise: tests/unit/test_dump_layers.py).
CAUSAL_SDPA = "causal_sdpa_without_mask"  # no "flash" in it: transformers reads such names as flash kernels


def use_causal_sdpa(model) -> bool:
    """Switch `model` from "sdpa" to CAUSAL_SDPA if no layer needs more than a causal mask; says whether it did."""
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    config, text = model.config, model.config.get_text_config()
    layer_types = getattr(text, "layer_types", None)
    plain = (all(t == "full_attention" for t in layer_types) if layer_types
             else getattr(text, "sliding_window", None) is None)
    if config._attn_implementation != "sdpa" or not plain or getattr(text, "attention_chunk_size", None):
        return False
    AttentionInterface.register(CAUSAL_SDPA, ALL_ATTENTION_FUNCTIONS["sdpa"])
    model.set_attn_implementation(CAUSAL_SDPA)
    return True


def decoder_layers(model) -> torch.nn.ModuleList:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise TypeError(f"cannot find the decoder layers of {type(model).__name__}")
    return layers


class HFBackend:
    name = "hf"

    def __init__(self, model, dtype: torch.dtype, target_layer_ids: list[int], device: str | None = None,
                 trust_remote_code: bool = False):
        """`model`: an HF folder or name, or an already built causal LM (benchmarks: a random one)."""
        from transformers import AutoModelForCausalLM

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if isinstance(model, torch.nn.Module):
            self.model = model.to(dtype)
        else:
            self.model = AutoModelForCausalLM.from_pretrained(model, dtype=dtype, trust_remote_code=trust_remote_code)
        self.model.to(self.device).eval().requires_grad_(False)
        use_causal_sdpa(self.model)
        self.target_layer_ids = target_layer_ids
        self._last_layer_output: torch.Tensor | None = None
        decoder_layers(self.model)[-1].register_forward_hook(self._keep_last_output)

    def _keep_last_output(self, module, inputs, output) -> None:
        self._last_layer_output = output[0] if isinstance(output, tuple) else output

    @torch.no_grad()  # not inference_mode: online training feeds these tensors to the draft, which saves them
    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(final [b, T, H], aux [b, T, n*H]) on the model's device, in the model dtype, for ids [b, T]. Rows may be
        right-padded: attention is causal, so padding after a sequence never reaches its positions."""
        out = self.model(input_ids.to(self.device, non_blocking=True), output_hidden_states=True, use_cache=False,
                         logits_to_keep=1)  # logits are not needed: skip the vocab projection
        aux = torch.cat([out.hidden_states[hf_hidden_states_index(k)] for k in self.target_layer_ids], dim=-1)
        return self._last_layer_output, aux

    @torch.inference_mode()
    def hidden_states(self, items: list[tuple[str, list[int]]]) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
        """Yield (id, final [T, H], aux [T, n*H]) on the CPU, in the model dtype."""
        for cid, ids in items:
            final, aux = self.forward(torch.tensor([ids]))
            yield cid, final[0].cpu(), aux[0].cpu()

    def close(self) -> None:
        self.model = None
