"""The target as the draft needs it: `embed_tokens`, `lm_head` and the final norm, frozen, and nothing else.

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

EMBED_NAMES = ("model.embed_tokens.weight", "model.language_model.embed_tokens.weight", "embed_tokens.weight")
LM_HEAD_NAMES = ("lm_head.weight",)
NORM_NAMES = ("model.norm.weight", "model.language_model.norm.weight", "norm.weight")


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
