"""Stage 3: offline DFlash training from hidden-state dumps (`dflashkit train`, `train_dflash.py`)."""

import logging


def main(argv: list[str] | None = None) -> int:
    from dflashkit.train.loop import main as loop_main

    try:
        return loop_main(argv)
    except OSError as e:  # a full disk, an unwritable output dir: one line with the path and the OS's reason, exit 1
        logging.getLogger("dflashkit.train").error("train stopped: %s", e)
        return 1
