"""The DFlash draft model: its config (the config.json contract), modules, masks, and the target's frozen head."""
from dflashkit.model.config import DFlashConfig
from dflashkit.model.draft import DFlashDraft
from dflashkit.model.target import TargetHead

__all__ = ["DFlashConfig", "DFlashDraft", "TargetHead"]
