"""Stage 4b: acceptance evaluation (`dflashkit eval`): our speculative loop with an HF target, and vLLM's figures.

Imports only torch, transformers, safetensors and pyyaml (plus the standard library): the GPU machines have no more.
"""


def main(argv: list[str] | None = None) -> int:
    from dflashkit.eval.run import main as run_main

    return run_main(argv)
