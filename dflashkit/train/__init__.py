"""Stage 3: offline DFlash training from hidden-state dumps (`dflashkit train`, `train_dflash.py`)."""


def main(argv: list[str] | None = None) -> int:
    from dflashkit.train.loop import main as loop_main

    return loop_main(argv)
