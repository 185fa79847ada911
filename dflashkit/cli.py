"""The `dflashkit` command: one subcommand per entry of COMMANDS, each handled by a module's `main(argv) -> int`.

The table holds only names, so `dflashkit --help` imports nothing heavy and each subcommand parses its own flags.

Exit codes: 0 done; 2 a user's mistake (a flag, a recipe or override that does not validate, a file that is missing,
unreadable or not what it should be): one line naming it, no traceback (`run_main`, which the top-level scripts use
too); 1 a stage that could not finish (a full disk, a server gone: the stage's own log line says why); 75 a generate
shard with retryable failures (rerun it).
"""
from __future__ import annotations

import importlib
import signal
import sys
from collections.abc import Callable

from dflashkit.config import UserError

EXIT_USAGE = 2  # argparse's own code for a bad flag
# What reaches the top and names what was wrong: a recipe, override, flag or file that is not what it should be
# (UserError), a file that cannot be read or written (the OS's error names it). Anything else is a bug in dflashkit,
# and keeps its traceback.
USER_ERRORS = (UserError, OSError)

# subcommand -> (module exposing main(argv), or "module:function" for another entry, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("dflashkit.demo", "the whole pipeline on SmolLM2 here: generate, dump, train, export, eval, a report"),
    "prepare": ("dflashkit.prepare", "build the SmolLM2 HF model and the MT-Bench/ShareGPT prompt sets in the cache"),
    "generate": ("dflashkit.generate", "run one generate shard against a running server (server_generate.py)"),
    "export": ("dflashkit.export", "export a trained draft as the HF folder vLLM (dflash) and SGLang (DFLASH) serve"),
    "eval": ("dflashkit.eval", "acceptance (tau, per position, lossless check) by our loop and through vLLM"),
    "train": ("dflashkit.train", "train a DFlash draft from hidden-state dumps; torchrun for many GPUs (train_dflash.py)"),
    "dump": ("dflashkit.dump", "dump one shard of target hidden states, --backend vllm|hf (compute_hidden_states_*.py)"),
    "check-template": ("dflashkit.template_check", "prove a loss mask (model template, or training template) is exact"),
    "check-dump": ("dflashkit.dump.check", "load and validate every record of dump dirs, in parallel, before training"),
    "plan-dump": ("dflashkit.plan:plan_dump_main", "the former dump planner: `dflashkit plan --model M --mean-tokens T`"),
    "submit": ("dflashkit.submit:submit_main", "submit a recipe's stages chained on Slurm (or run them locally)"),
    "status": ("dflashkit.status:status_main", "per stage and shard of a run: done/stale/failed/running/pending/missing"),
    "rerun": ("dflashkit.submit:rerun_main", "resubmit the failed, missing and stale shards of a stage, and the stages after it"),
    "plan": ("dflashkit.plan", "a recipe's shards, disk per stage and mode, GPU-hours (bench/throughputs.json), before submitting"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: dflashkit COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`dflashkit COMMAND --help` describes each command's flags."]
    return "\n".join(lines)


def exit_on_sigterm(signum, frame) -> None:
    # Python's default SIGTERM ends the process without unwinding the stack, so a vLLM server started by
    # serve.running_server (eval, demo) would outlive it. SystemExit unwinds: every context manager stops what it started.
    raise SystemExit(128 + signum)


def run_main(prog: str, main: Callable[[list[str]], int | None], argv: list[str]) -> int:
    """`main(argv)`, with a user error (USER_ERRORS) as one line `prog: message` and exit 2."""
    try:
        return main(argv) or 0
    except USER_ERRORS as e:
        print(f"{prog}: " + "; ".join(line.strip() for line in str(e).splitlines() if line.strip()), file=sys.stderr)
        return EXIT_USAGE


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"dflashkit: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module_name, _, function = COMMANDS[name][0].partition(":")
    module = importlib.import_module(module_name)
    return run_main(f"dflashkit {name}", getattr(module, function or "main"), rest)


if __name__ == "__main__":
    sys.exit(main())
