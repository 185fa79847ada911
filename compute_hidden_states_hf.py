#!/usr/bin/env python
"""Dump DFlash training hidden states with transformers: the reference backend (see `--help`, docs/FORMATS.md)."""
import sys

from dflashkit.dump.run import main

if __name__ == "__main__":
    sys.exit(main(backend="hf", prog="compute_hidden_states_hf.py"))
