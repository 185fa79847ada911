"""Which hidden states a DFlash draft reads, and how each backend names them.

The one convention (docs/FORMATS.md, "Hidden-state dumps"): DFlash target layer id k is the output of decoder layer k
(0-based), i.e. the residual stream after k+1 decoder layers. Under that id:

- HF transformers: `outputs.hidden_states[k + 1]` (index 0 is the embeddings), for k < L - 1. The last entry,
  `hidden_states[L]`, is NOT the output of decoder layer L-1: transformers applies the final norm to it.
- vLLM aux-hidden-state capture (EAGLE-style `eagle_aux_hidden_state_layer_ids`): capture id k + 1, because vLLM
  captures "after idx+1 layers" (and id 0 is the embeddings). vLLM's own DFlash loader adds this +1 itself.

The final state stored next to the target layers is the output of the last decoder layer, before the model's final
norm ("pre_norm"): that is what vLLM's capture id L holds, and the HF backend takes the same tensor with a hook.
"""
from __future__ import annotations

from typing import Any

# Wrapped (VL / multimodal) configs keep the language model's shape under one of these.
TEXT_CONFIG_KEYS = ("text_config", "llm_config", "language_config")
FINAL_STATE = "pre_norm"
CONVENTION = "dflash: id k = output of decoder layer k = HF hidden_states[k+1] = vLLM capture id k+1"


def _get(cfg: Any, key: str) -> Any:
    return cfg.get(key) if isinstance(cfg, dict) else getattr(cfg, key, None)


def text_config(cfg: Any) -> Any:
    """The language-model part of a (possibly wrapped) HF config, as an object or a config.json dict."""
    for key in TEXT_CONFIG_KEYS:
        inner = _get(cfg, key)
        if inner is not None and _get(inner, "num_hidden_layers") is not None:
            return inner
    return cfg


def num_hidden_layers(cfg: Any) -> int:
    n = _get(text_config(cfg), "num_hidden_layers")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"config has no usable num_hidden_layers (looked in the top level and {TEXT_CONFIG_KEYS})")
    return n


def hidden_size(cfg: Any) -> int:
    h = _get(text_config(cfg), "hidden_size")
    if not isinstance(h, int) or h < 1:
        raise ValueError(f"config has no usable hidden_size (looked in the top level and {TEXT_CONFIG_KEYS})")
    return h


def default_target_layer_ids(num_layers: int, num_draft_layers: int) -> list[int]:
    """DFlash's default: `num_draft_layers` ids spread evenly over [1, L-3] (36 layers, 5 -> [1, 9, 17, 25, 33])."""
    if num_draft_layers < 1:
        raise ValueError(f"num_draft_layers must be >= 1, got {num_draft_layers}")
    if num_draft_layers == 1:
        return [num_layers // 2]
    first, last = 1, num_layers - 3
    if last < first:
        raise ValueError(f"a model with {num_layers} layers is too shallow for the DFlash layer spread [1, L-3]")
    if num_draft_layers > last - first + 1:
        raise ValueError(f"{num_draft_layers} target layers do not fit the spread [1, {last}] of a {num_layers}-layer "
                         "model (distinct layers)")
    return [round(first + i * (last - first) / (num_draft_layers - 1)) for i in range(num_draft_layers)]


def check_target_layer_ids(ids: list[int], num_layers: int) -> list[int]:
    """Target ids must be distinct decoder layers in increasing order (the aux tensor concatenates them in order)."""
    if not ids:
        raise ValueError("no target layer ids")
    if sorted(set(ids)) != list(ids):
        raise ValueError(f"target layer ids {ids} must be strictly increasing")
    if ids[0] < 0 or ids[-1] > num_layers - 2:
        # Layer L-1 would be captured post-norm by HF, so it cannot be a target under one convention for both backends.
        raise ValueError(f"target layer ids {ids} must lie in [0, {num_layers - 2}] for a {num_layers}-layer model")
    return list(ids)


def hf_hidden_states_index(layer_id: int) -> int:
    return layer_id + 1


def vllm_capture_id(layer_id: int) -> int:
    return layer_id + 1
