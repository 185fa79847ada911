#!/usr/bin/env python3
"""Train a DFlash draft from hidden-state dumps. Under torchrun for several GPUs/nodes:

    torchrun --nproc-per-node 8 train_dflash.py --config configs/train/smollm2-gpu.yaml target_model=MODEL \
        output_dir=RUN/train data.dump_dirs=[RUN/dump]

A recipe's train stage runs it with the resolved `train.config` (`dflashkit submit`, slurm/train.sbatch). See
`python train_dflash.py --help` and docs/TRAINING.md.
"""
import sys

from dflashkit.cli import run_main
from dflashkit.train import main

if __name__ == "__main__":
    sys.exit(run_main("train_dflash.py", main, sys.argv[1:]))
