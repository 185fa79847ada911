"""`dflashkit demo`: the whole pipeline on SmolLM2-135M-Instruct, on this machine, with the local executor.

prepare -> generate -> dump -> train -> export + eval (our loop and vLLM), all four stages by `dflashkit submit` with
the local executor, then a short report: counts per stage, tau from both loops, where the files are. It is the recipe
`configs/smollm2-demo.yaml` run end to end; any dotted override of that recipe can be passed
(`dflashkit demo generate.max_conversations=32`).
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from .eval.plots import training_curve
from .eval.run import headline
from .io import read_json
from .prepare import prepare
from .recipe import ROOT, load_recipe

log = logging.getLogger("dflashkit.demo")
DEMO_RECIPE = ROOT / "configs" / "smollm2-demo.yaml"


def _step(name: str, fn, *args) -> None:
    t0 = time.monotonic()
    log.info("=== %s", name)
    code = fn(*args)
    if code:
        raise SystemExit(f"dflashkit demo: {name} failed (exit {code}); see the log above and `dflashkit status`")
    log.info("=== %s done in %.0f s", name, time.monotonic() - t0)


def _shard_counts(stage_dir: Path) -> dict[str, int]:
    totals: dict[str, int] = {}
    for marker in sorted(stage_dir.glob("shard-*.done.json")):
        for key, value in read_json(marker)["counts"].items():
            totals[key] = totals.get(key, 0) + value
    return totals


def report(run_dir: Path) -> str:
    lines = [f"run dir: {run_dir}",
             f"generate: {_shard_counts(run_dir / 'generate')}",
             f"dump:     {_shard_counts(run_dir / 'dump')}"]
    metrics = run_dir / "train" / "metrics.jsonl"
    if metrics.exists():
        rows = training_curve(metrics)
        first, last = rows[0], rows[-1]
        lines.append(f"train:    {last.get('step')} steps, loss {first.get('loss'):.3f} -> {last.get('loss'):.3f}")
    lines.append(f"eval:     {headline(read_json(run_dir / 'eval' / 'report.json'))}")
    lines.append(f"draft: {run_dir / 'export' / 'draft'}   report: {run_dir / 'eval' / 'report.json'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dflashkit demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", default="runs/demo", help="where the run goes (default: runs/demo)")
    p.add_argument("overrides", nargs="*", help="dotted overrides of configs/smollm2-demo.yaml")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from . import cli

    t0 = time.monotonic()
    _step("prepare (model and prompts)", lambda: prepare() and 0)
    overrides = [f"run.dir={Path(args.run_dir).absolute()}", "run.executor=local", *args.overrides]
    recipe = load_recipe(DEMO_RECIPE, overrides)
    _step("generate, dump, train, export + eval (local executor)", cli.main,
          ["submit", "--recipe", str(DEMO_RECIPE), "--stages", "generate,dump,train,eval", *overrides])
    print(f"\n{report(recipe.run_dir())}\ndemo finished in {time.monotonic() - t0:.0f} s")
    return 0
