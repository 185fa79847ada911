"""The generate stage: regenerate assistant turns of a prompt dataset, one shard per Slurm array task.

`run` (and the openai client it needs) is imported only when generating; `inputs` and `settings` need neither, and no
later stage imports this package (they read its output files: docs/FORMATS.md).
"""


def main(argv: list[str] | None = None) -> int:
    from .run import main as run_main

    return run_main(argv)
