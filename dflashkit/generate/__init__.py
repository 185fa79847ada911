"""The generate stage: regenerate assistant turns of a prompt dataset, one shard per Slurm array task."""
from .run import main, run_shard, shard_name  # noqa: F401
