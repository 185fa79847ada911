#!/usr/bin/env python
"""Dump DFlash training hidden states with vLLM (one shard; see `--help` and docs/FORMATS.md)."""
import sys

from dflashkit.dump.run import main

if __name__ == "__main__":
    sys.exit(main(backend="vllm", prog="compute_hidden_states_vllm.py"))
