"""The draft models (DFlash, DSpark): their configs (the config.json contract), modules, masks, the kinds table,
and the target's frozen head."""
from dflashkit.model.config import DFlashConfig
from dflashkit.model.draft import DFlashDraft
from dflashkit.model.dspark import DSparkConfig, DSparkDraft
from dflashkit.model.kinds import KINDS, DraftKind, config_from_dict, kind_of, kind_of_config
from dflashkit.model.target import TargetHead

__all__ = ["KINDS", "DFlashConfig", "DFlashDraft", "DSparkConfig", "DSparkDraft", "DraftKind", "TargetHead",
           "config_from_dict", "kind_of", "kind_of_config"]
