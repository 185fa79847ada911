"""The generate stage: regenerate assistant turns of a prompt dataset, one shard per Slurm array task.

`run` (and the openai client it needs) is imported only when generating: later stages import `generate.inputs` on GPU
machines that have no openai.
"""


def main(argv: list[str] | None = None) -> int:
    from .run import main as run_main

    return run_main(argv)
