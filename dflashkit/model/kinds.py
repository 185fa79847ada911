"""The draft kinds: what a kind is made of, in one table read by training, export and eval.

A kind is its config class (the config.json contract, told apart by `architectures`), its module, and how servers
name it. Behaviour that differs between kinds lives on those classes (`num_drafts`, `propose`,
`teacher_forced_logits`) and, for training, in `dflashkit.train.objectives`, both keyed by the same names.
"""
from __future__ import annotations

from dataclasses import dataclass

from dflashkit.model.config import DFlashConfig
from dflashkit.model.draft import DFlashDraft
from dflashkit.model.dspark import DSparkConfig, DSparkDraft


@dataclass(frozen=True)
class DraftKind:
    name: str
    config: type[DFlashConfig]
    model: type[DFlashDraft]
    vllm_method: str  # speculative-config "method"; num_speculative_tokens is model.num_drafts(block_size)
    sglang_algorithm: str  # --speculative-algorithm


KINDS = {kind.name: kind for kind in (
    DraftKind("dflash", DFlashConfig, DFlashDraft, "dflash", "DFLASH"),
    DraftKind("dspark", DSparkConfig, DSparkDraft, "dspark", "DSPARK"),
)}


def kind_of_config(config: dict) -> DraftKind:
    """The kind a config.json (as a dict) describes, by its `architectures`."""
    architectures = config.get("architectures", [DFlashConfig.architecture])
    for kind in KINDS.values():
        if architectures == [kind.config.architecture]:
            return kind
    known = ", ".join(f"{k.config.architecture} ({k.name})" for k in KINDS.values())
    raise ValueError(f"architectures {architectures}: not a draft dflashkit knows (one of {known})")


def kind_of(cfg: DFlashConfig) -> DraftKind:
    return next(kind for kind in KINDS.values() if type(cfg) is kind.config)


def config_from_dict(config: dict) -> DFlashConfig:
    return kind_of_config(config).config.from_dict(config)
