"""The target as the draft needs it: `embed_tokens`, `lm_head` and the final norm, frozen; and, for a draft
initialized from the target's own layers (`model.init_from_target_layers`), the tensors of those decoder layers.

Loaded tensor by tensor from the target's safetensors (only the shards that hold them), never the full model: for a
400B-class target the three tensors are a few GB, the model is hundreds. A target with tied embeddings
(`tie_word_embeddings: true`, e.g. SmolLM2) has no `lm_head.weight`; its lm_head is `embed_tokens`.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dflashkit.config import ConfigError

# Where a target keeps its language model's tensors: a causal LM, a multimodal target's text model, a bare model.
PREFIXES = ("model.", "model.language_model.", "")
EMBED_NAMES = tuple(f"{p}embed_tokens.weight" for p in PREFIXES)
LM_HEAD_NAMES = ("lm_head.weight",)
NORM_NAMES = tuple(f"{p}norm.weight" for p in PREFIXES)
# Draft layer tensors a target layer may lack: Llama-style targets have no QK-norm (the draft's stay at ones).
OPTIONAL_LAYER_TENSORS = ("self_attn.q_norm.weight", "self_attn.k_norm.weight")


def read_target_config(model_dir: str | Path) -> dict:
    with open(Path(model_dir) / "config.json", encoding="utf-8") as f:
        config = json.load(f)
    return config.get("text_config", config) | {"tie_word_embeddings": config.get("tie_word_embeddings", False)}


def _tensor_files(model_dir: Path) -> dict[str, Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        with open(index, encoding="utf-8") as f:
            return {name: model_dir / file for name, file in json.load(f)["weight_map"].items()}
    from safetensors import safe_open

    files = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            files.update(dict.fromkeys(f.keys(), path))
    return files


def _load(files: dict[str, Path], candidates: tuple[str, ...], what: str, model_dir: Path) -> torch.Tensor:
    from safetensors import safe_open

    for name in candidates:
        if name in files:
            with safe_open(files[name], "pt") as f:
                return f.get_tensor(name)
    raise FileNotFoundError(f"{model_dir}: no {what} tensor (looked for {', '.join(candidates)})")


class TargetHead(nn.Module):
    """Frozen embed_tokens / lm_head / final norm of the target."""

    def __init__(self, embed: torch.Tensor, lm_head: torch.Tensor | None, norm: torch.Tensor, norm_eps: float):
        super().__init__()
        self.embed_tokens = nn.Embedding.from_pretrained(embed, freeze=True)
        self.tied = lm_head is None
        if not self.tied:
            self.lm_head_weight = nn.Parameter(lm_head, requires_grad=False)
        self.norm_weight = nn.Parameter(norm, requires_grad=False)
        self.norm_eps = norm_eps

    @property
    def lm_head(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.tied else self.lm_head_weight

    @property
    def vocab_size(self) -> int:
        return self.lm_head.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.lm_head.shape[1]

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        """The target's own final RMSNorm, for turning pre-norm dumped hidden states into its logits."""
        normed = F.rms_norm(hidden.float(), (hidden.shape[-1],), eps=self.norm_eps)
        return (self.norm_weight.float() * normed).to(hidden.dtype)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, dtype: torch.dtype | None = None) -> TargetHead:
        model_dir = Path(model_dir)
        config = read_target_config(model_dir)
        files = _tensor_files(model_dir)
        embed = _load(files, EMBED_NAMES, "embed_tokens", model_dir)
        tied = bool(config.get("tie_word_embeddings")) or not any(n in files for n in LM_HEAD_NAMES)
        lm_head = None if tied else _load(files, LM_HEAD_NAMES, "lm_head", model_dir)
        norm = _load(files, NORM_NAMES, "final norm", model_dir)
        if dtype is not None:
            embed, norm = embed.to(dtype), norm.to(dtype)
            lm_head = None if lm_head is None else lm_head.to(dtype)
        return cls(embed, lm_head, norm, float(config.get("rms_norm_eps", 1e-6)))


@torch.no_grad()
def copy_target_layers(layers: nn.ModuleList, model_dir: str | Path, layer_ids: list[int]) -> None:
    """Draft layer i takes the weights of target decoder layer `layer_ids[i]`: each of its parameters (q/k/v/o_proj
    and their biases, q_norm/k_norm, gate/up/down_proj, both layer norms) from the target tensor of the same name,
    which must have the same shape. A target tensor the draft layer has no place for (a bias, a scale, another norm)
    is refused: the draft would not start as that layer."""
    model_dir = Path(model_dir)
    files = _tensor_files(model_dir)
    for i, (layer, t) in enumerate(zip(layers, layer_ids, strict=True)):
        prefixes = [f"{p}layers.{t}." for p in PREFIXES]
        prefix = next((p for p in prefixes if any(name.startswith(p) for name in files)), None)
        if prefix is None:
            raise FileNotFoundError(f"{model_dir}: no decoder layer {t} (looked for {', '.join(prefixes)}*)")
        params = dict(layer.named_parameters())
        unmatched = sorted(n for n in files if n.startswith(prefix) and n[len(prefix):] not in params
                           and not n.endswith("inv_freq"))
        if unmatched:
            raise ConfigError(f"model.init_from_target_layers: target tensors {', '.join(unmatched)} have no "
                              f"counterpart in draft layers.{i} (a Qwen3-style layer: attention projections, "
                              f"QK-norm, SwiGLU MLP, two norms), which would not start as target layer {t}")
        for name, param in params.items():
            if prefix + name not in files and name in OPTIONAL_LAYER_TENSORS:
                continue
            tensor = _load(files, (prefix + name,), f"layer {t} {name}", model_dir)
            if tensor.shape != param.shape:
                raise ConfigError(f"model.init_from_target_layers: target {prefix + name} is {list(tensor.shape)}, "
                                  f"draft layers.{i}.{name} is {list(param.shape)} (the draft's dims must be the "
                                  f"target's: leave model.intermediate_size, heads and head_dim unset)")
            param.copy_(tensor)
