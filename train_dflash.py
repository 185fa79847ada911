#!/usr/bin/env python3
"""Train a DFlash draft from hidden-state dumps. Under torchrun for several GPUs/nodes:

    torchrun --nproc-per-node 8 train_dflash.py --config configs/train/qwen3-8b.yaml data.dump_dirs=[RUN/dump]

See `python train_dflash.py --help` and docs/TRAINING.md.
"""
import sys

from dflashkit.cli import run_main
from dflashkit.train import main

if __name__ == "__main__":
    sys.exit(run_main("train_dflash.py", main, sys.argv[1:]))
