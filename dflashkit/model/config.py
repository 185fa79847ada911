"""The DFlash draft's config: the `config.json` layout that z-lab's checkpoints, vLLM and SGLang read.

The config is the contract between training, export and serving. A draft's `config.json` looks like

    {"architectures": ["DFlashDraftModel"], "model_type": "qwen3", "block_size": 16, "num_target_layers": 36,
     "dflash_config": {"mask_token_id": 151669, "target_layer_ids": [1, 9, 17, 25, 33]},
     "hidden_size": 4096, "num_hidden_layers": 5, "num_attention_heads": 32, "num_key_value_heads": 8,
     "head_dim": 128, "intermediate_size": 12288, "rms_norm_eps": 1e-6, "rope_theta": 1000000,
     "rope_scaling": null, "max_position_embeddings": 40960, "layer_types": ["full_attention", ...],
     "vocab_size": 151936, "tie_word_embeddings": false, ...}

`target_layer_ids` follow the DFlash convention: id k is the output of target decoder layer k, which is HF's
`hidden_states[k + 1]` and vLLM's auxiliary capture id k + 1. Keys this class does not model (`bos_token_id`,
`auto_map`, `dtype`, `dflash_config.use_swa`, ...) are kept verbatim, so reading and writing a config loses nothing.
Rope settings are read from either spelling (`rope_theta` + `rope_scaling`, or transformers 5's `rope_parameters`)
and written as the spelling they were read in.
"""
from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ARCHITECTURE = "DFlashDraftModel"


@dataclass
class DFlashConfig:
    architecture = ARCHITECTURE  # the `architectures` entry of config.json (class attributes, not fields)
    kind_label = "DFlash"

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    target_layer_ids: list[int]
    num_target_layers: int
    mask_token_id: int
    block_size: int = 16
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 40960
    hidden_act: str = "silu"
    attention_bias: bool = False
    model_type: str = "qwen3"
    # Where the rope settings live in config.json: "rope_theta" (rope_theta + rope_scaling) or "rope_parameters".
    rope_layout: str = "rope_theta"
    # Keys of config.json / of its dflash_config this class does not model, kept for a lossless round trip.
    extra: dict[str, Any] = field(default_factory=dict)
    dflash_extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act {self.hidden_act!r}: the DFlash draft layers use SwiGLU (silu)")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}")
        if not self.target_layer_ids:
            raise ValueError("target_layer_ids is empty")
        bad = [i for i in self.target_layer_ids if not 0 <= i < self.num_target_layers]
        if bad:
            raise ValueError(f"target_layer_ids {bad} outside the target's {self.num_target_layers} layers")
        if not 0 <= self.mask_token_id < self.vocab_size:
            raise ValueError(f"mask_token_id {self.mask_token_id} is not below vocab_size {self.vocab_size}")
        if self.block_size < 2:
            raise ValueError(f"block_size {self.block_size}: a block needs the anchor and at least one mask")

    @property
    def num_fused_layers(self) -> int:
        return len(self.target_layer_ids)

    # -- config.json layout ------------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: dict) -> DFlashConfig:
        data = copy.deepcopy(data)
        if data.get("architectures", [cls.architecture]) != [cls.architecture]:
            raise ValueError(f"architectures {data['architectures']}: not a {cls.kind_label} draft ({cls.architecture})")
        dflash = data.pop("dflash_config", None) or {}
        for key in ("mask_token_id", "target_layer_ids"):
            if key not in dflash:
                raise ValueError(f"config.json: dflash_config.{key} is missing")
        kwargs: dict[str, Any] = {"mask_token_id": dflash.pop("mask_token_id"),
                                  "target_layer_ids": list(dflash.pop("target_layer_ids"))}
        # Some checkpoints (Qwen3.5 drafts) keep block_size inside dflash_config; it is the same setting.
        block_in_dflash = "block_size" in dflash
        if block_in_dflash:
            kwargs["block_size"] = dflash.pop("block_size")
        if "rope_parameters" in data:
            rope = dict(data.pop("rope_parameters") or {})
            kwargs["rope_theta"] = float(rope.pop("rope_theta", cls.rope_theta))
            kwargs["rope_scaling"] = rope if rope not in ({}, {"rope_type": "default"}) else None
            kwargs["rope_layout"] = "rope_parameters"
        else:
            if "rope_theta" in data:
                kwargs["rope_theta"] = float(data.pop("rope_theta"))
            kwargs["rope_scaling"] = data.pop("rope_scaling", None)
        if "head_dim" not in data:
            data["head_dim"] = data["hidden_size"] // data["num_attention_heads"]
        layer_types = data.pop("layer_types", None)
        if layer_types is not None and any(t != "full_attention" for t in layer_types):
            raise ValueError(f"layer_types {layer_types}: only full_attention draft layers are supported")
        data.pop("architectures", None)
        data.pop("tie_word_embeddings", None)  # always false for a draft: it owns no embeddings
        modelled = {f.name for f in dataclasses.fields(cls)} - {"extra", "dflash_extra", "rope_layout"}
        for name in list(data):
            if name in modelled and name not in kwargs:
                kwargs[name] = data.pop(name)
        if block_in_dflash:
            dflash["block_size"] = None  # remembered position; filled in on write
        return cls(**kwargs, extra=data, dflash_extra=dflash)

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"architectures": [self.architecture], "model_type": self.model_type}
        dflash = {"mask_token_id": self.mask_token_id, "target_layer_ids": list(self.target_layer_ids)}
        for key, value in self.dflash_extra.items():
            dflash[key] = self.block_size if key == "block_size" else copy.deepcopy(value)
        if "block_size" not in self.dflash_extra:
            out["block_size"] = self.block_size
        out.update(
            hidden_size=self.hidden_size, num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads, num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim, intermediate_size=self.intermediate_size, vocab_size=self.vocab_size,
            num_target_layers=self.num_target_layers, rms_norm_eps=self.rms_norm_eps,
            max_position_embeddings=self.max_position_embeddings, hidden_act=self.hidden_act,
            attention_bias=self.attention_bias, layer_types=["full_attention"] * self.num_hidden_layers,
            tie_word_embeddings=False, dflash_config=dflash,
        )
        if self.rope_layout == "rope_parameters":
            out["rope_parameters"] = {"rope_theta": self.rope_theta, **(self.rope_scaling or {"rope_type": "default"})}
        else:
            out["rope_theta"] = self.rope_theta
            out["rope_scaling"] = copy.deepcopy(self.rope_scaling)
        out.update(copy.deepcopy(self.extra))
        return out

    @classmethod
    def from_json(cls, path: str | Path) -> DFlashConfig:
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def for_target(cls, target: dict, *, num_hidden_layers: int, target_layer_ids: list[int], mask_token_id: int,
                   block_size: int = 16, **overrides: Any) -> DFlashConfig:
        """A draft shaped like the target's decoder layers (hidden size must match: the draft shares its
        embeddings and lm_head). `target` is the target's config.json as a dict; `overrides` change any dim."""
        text = target.get("text_config", target)  # multimodal targets nest the language model's config
        rope = text.get("rope_parameters") or {}
        dims = {
            "hidden_size": text["hidden_size"], "num_attention_heads": text["num_attention_heads"],
            "num_key_value_heads": text.get("num_key_value_heads", text["num_attention_heads"]),
            "head_dim": text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"],
            "intermediate_size": text["intermediate_size"], "vocab_size": text["vocab_size"],
            "rms_norm_eps": float(text.get("rms_norm_eps", 1e-6)),
            "rope_theta": float(text.get("rope_theta", rope.get("rope_theta", cls.rope_theta))),
            "max_position_embeddings": text.get("max_position_embeddings", cls.max_position_embeddings),
        }
        dims.update(overrides)
        return cls(num_hidden_layers=num_hidden_layers, target_layer_ids=list(target_layer_ids),
                   num_target_layers=text["num_hidden_layers"], mask_token_id=mask_token_id,
                   block_size=block_size, **dims)

    def to_hf_config(self):
        """The equivalent transformers Qwen3Config (used for its rope implementation)."""
        from transformers import Qwen3Config

        rope = {"rope_type": "default", **(self.rope_scaling or {}), "rope_theta": self.rope_theta}
        return Qwen3Config(
            hidden_size=self.hidden_size, num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads, num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim, intermediate_size=self.intermediate_size, vocab_size=self.vocab_size,
            rms_norm_eps=self.rms_norm_eps, max_position_embeddings=self.max_position_embeddings,
            rope_parameters=rope,
        )
