"""Stage 3: offline DFlash training from hidden-state dumps (`dflashkit train`, `train_dflash.py`)."""

import logging


def main(argv: list[str] | None = None) -> int:
    from dflashkit.shards import UnusableInput
    from dflashkit.train.loop import main as loop_main

    try:
        return loop_main(argv)
    except (OSError, UnusableInput) as e:  # a full disk, an unwritable output dir, an input with no records: one
        # line with the path and the reason, exit 1 (a recipe or file that is not what it should be is exit 2: cli)
        logging.getLogger("dflashkit.train").error("train stopped: %s", e)
        return 1
