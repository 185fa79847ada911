#!/usr/bin/env python3
"""Regenerate the assistant turns of one shard of a prompt dataset. See `--help` and docs/FORMATS.md."""
import sys

from dflashkit.cli import run_main
from dflashkit.generate import main

if __name__ == "__main__":
    sys.exit(run_main("server_generate.py", main, sys.argv[1:]))
