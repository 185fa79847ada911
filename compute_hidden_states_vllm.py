#!/usr/bin/env python
"""Dump DFlash training hidden states with vLLM (one shard; see `--help` and docs/FORMATS.md)."""
import sys

from dflashkit.cli import run_main
from dflashkit.dump.run import main

if __name__ == "__main__":
    prog = "compute_hidden_states_vllm.py"
    sys.exit(run_main(prog, lambda argv: main(argv, backend="vllm", prog=prog), sys.argv[1:]))
