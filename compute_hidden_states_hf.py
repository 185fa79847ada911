#!/usr/bin/env python
"""Dump DFlash training hidden states with transformers: the reference backend (see `--help`, docs/FORMATS.md)."""
import sys

from dflashkit.cli import run_main
from dflashkit.dump.run import main

if __name__ == "__main__":
    prog = "compute_hidden_states_hf.py"
    sys.exit(run_main(prog, lambda argv: main(argv, backend="hf", prog=prog), sys.argv[1:]))
