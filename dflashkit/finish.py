"""The eval stage of a run: export the trained draft, then evaluate it, on one GPU node, as one Python function.

`dflashkit submit` sends `export_and_eval(run_dir)` through submitit (it runs on the node with this checkout and this
interpreter); the local executor runs `python -m dflashkit.finish RUN_DIR`. The commands are the ones `dflashkit plan`
prints (the recipe's export and eval sections); the marker `RUN/eval/done.json` is written last and says which train
marker the draft came from, so a retrained draft makes the eval stale.
"""
from __future__ import annotations

import sys
from pathlib import Path

from .config import from_dict
from .plan import eval_command, export_command
from .recipe import Recipe
from .rundir import load_manifest
from .shards import EXIT_OK, fingerprint, setup_logging, write_done_marker


def export_and_eval(run_dir: str) -> dict:
    """Export RUN/train's latest checkpoint to RUN/export/draft, evaluate it into RUN/eval, mark the stage done.
    Returns the marker; raises RuntimeError when a step fails (submitit reports it as the job's failure)."""
    from . import export
    from .eval import run as evaluate

    setup_logging()
    run = Path(run_dir)
    recipe = from_dict(Recipe, load_manifest(run)["recipe"])
    made_from = fingerprint(run / "train")
    # --overwrite: a rerun of this stage (a failed eval, a retrained draft) replaces the draft it exported before.
    # --train-log: the report's loss curve, from the run's own training.
    train_log = run / "train" / "metrics.jsonl"
    steps = [("export", export.main, [*export_command(recipe)[2:], "--overwrite"]),
             ("eval", evaluate.main, [*eval_command(recipe)[2:], *(["--train-log", str(train_log)]
                                                                  if train_log.exists() else [])])]
    for name, main, argv in steps:
        code = main(argv)
        if code:
            raise RuntimeError(f"{name} exited {code} (its log lines above say why)")
    marker = run / "eval" / "done.json"
    write_done_marker(marker, "eval", None, made_from, draft=str(run / "export" / "draft"),
                      report=str(run / "eval" / "report.json"))
    return {"marker": str(marker), "made_from": made_from}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m dflashkit.finish RUN_DIR", file=sys.stderr)
        return 2
    try:
        export_and_eval(argv[0])
    except RuntimeError as e:
        print(f"dflashkit eval stage: {e}", file=sys.stderr)
        return 1
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
