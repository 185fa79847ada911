"""The generate stage's settings, each with its one default: worker.sh's variables, server_generate.py's flags and the
recipe's generate keys (the variables in lower case) are the same knobs.

server_generate.py takes its flag defaults from here and README's variable table is printed from here (`python -m
dflashkit.generate.settings readme`); tests/unit/test_generate_settings.py fails when that table, docs/RECIPES.md's
generate table, worker.sh's own `${VAR:-default}` or the recipe's generate fields drift from it. Standard library only.
"""
from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from typing import Any


@dataclasses.dataclass(frozen=True)
class Setting:
    var: str  # worker.sh's variable
    default: Any  # what applies when it is not set; None: nothing (the flag is not passed)
    meaning: str
    flag: str | None = None  # server_generate.py's flag; None: worker.sh reads it itself
    recipe: bool = True  # a key of the recipe's generate section (lower case); False: the run sets it
    shown: str | None = None  # the default as the docs show it, when it is not a plain value
    minimum: float | None = None  # the least value that can work; below it the client and the recipe refuse it

    @property
    def key(self) -> str:
        return self.var.lower()

    def shown_default(self) -> str:
        if self.shown is not None:
            return self.shown
        return "none" if self.default is None else str(self.default)


SETTINGS: tuple[Setting, ...] = (
    Setting("MODEL", None, "model path or hub name the server loads", recipe=False, shown="required"),
    Setting("INPUT", None, "prompt file/dir/datasets name", "--input", shown="required"),
    Setting("OUTPUT_DIR", None, "the shard output dir", "--output-dir", recipe=False, shown="required"),
    Setting("BACKEND", "vllm", "`vllm` or `sglang`"),
    Setting("SERVED_MODEL_NAME", None, "name the server serves the model under", "--model", recipe=False,
            shown="`$MODEL`"),
    Setting("TP_SIZE", 1, "tensor parallel size per server", minimum=1),
    Setting("SERVERS_PER_NODE", 1, "servers per task, each on its own `TP_SIZE` GPUs of `CUDA_VISIBLE_DEVICES`, the "
            "client spreading requests over them", minimum=1),
    Setting("SERVER_STARTUP_TIMEOUT", 1800, "seconds to wait for `/health`; a server that exits while starting fails "
            "the task at once, with its log tail", minimum=1),
    Setting("PORT_BASE", 20000, "preferred port base (a busy port moves to a free one)"),
    Setting("VLLM_SERVE_EXTRA_ARGS", None, "extra vLLM server flags, split with shell word rules (quotes group; "
            "nothing is expanded or executed), one word (`--enforce-eager`, `--max-model-len=2048`) or many; `--host`, "
            "`--port`, `--api-key` are refused"),
    Setting("SGLANG_SERVE_EXTRA_ARGS", None, "the same for SGLang"),
    Setting("NUM_SHARDS", None, "shard count; default from the Slurm array (with it set, the task id is the shard "
            "id, so `--array=3,7` reruns shards 3 and 7)", "--num-shards", shown="the array's size, else 1"),
    Setting("SHARD_ID", None, "shard id; default from the Slurm array (arrays may start at 1)", "--shard-id",
            recipe=False, shown="the array task, else 0"),
    Setting("THINKING_MODES", None, "e.g. `enabled,disabled,adaptive`: conversation `i` (global index) uses "
            "`modes[i % n]`; another name must be a key of `THINKING_MODE_MAP`, else the worker stops before starting "
            "a server", "--thinking-modes"),
    Setting("THINKING_MODE_KEY", "thinking_mode", "the `chat_template_kwargs` key of the mode (Qwen3: "
            "`enable_thinking`)", "--thinking-mode-key"),
    Setting("THINKING_MODE_MAP", None, 'JSON map of mode to the value sent, e.g. `{"enabled": true, "disabled": '
            'false}` for Qwen3', "--thinking-mode-map", shown="the mode name as is"),
    Setting("CHAT_TEMPLATE_KWARGS", None, "JSON object sent with every request, merged with the mode",
            "--chat-template-kwargs"),
    Setting("THINK_OPEN_TAG", "<think>", "tag opening reasoning the server returned separately (MiniMax-M3: "
            "`<mm:think>`)", "--think-tags", shown="`<think>`"),
    Setting("THINK_CLOSE_TAG", "</think>", "its closing tag (MiniMax-M3: `</mm:think>`)", "--think-tags",
            shown="`</think>`"),
    Setting("OUTPUT_FORMAT", "oai", "`oai` (`messages`) or `sharegpt` (`conversations`)", "--output-format"),
    Setting("ON_LENGTH", "keep", "a reply cut at `MAX_TOKENS`: `keep` it marked truncated, or `drop` the "
            "conversation", "--on-length"),
    Setting("TEMPERATURE", 0.7, "sampling temperature", "--temperature", minimum=0),
    Setting("TOP_P", 1.0, "nucleus sampling", "--top-p"),
    Setting("MAX_TOKENS", 2048, "tokens per reply", "--max-tokens", minimum=1),
    Setting("SEED", None, "sampling seed", "--seed"),
    Setting("SYSTEM_PROMPT", None, "added to conversations that have no system turn", "--system-prompt"),
    Setting("CONCURRENCY", 64, "in-flight conversations", "--concurrency", minimum=1),
    Setting("REQUEST_TIMEOUT", 600.0, "seconds per request", "--request-timeout"),
    Setting("MAX_RETRIES", 5, "retries on connection errors, 429 and 5xx", "--max-retries", minimum=0),
    Setting("MAX_CONVERSATIONS", None, "read only the first N input records", "--max-conversations", minimum=0),
    Setting("DFLASHKIT_ROOT", None, "the dflashkit checkout, when the script runs from a copy (sbatch's spool dir)",
            recipe=False, shown="next to the script"),
    Setting("LOG_DIR", None, "server logs", recipe=False, shown="`$OUTPUT_DIR/logs`"),
    Setting("PYTHON", "python3", "interpreter", recipe=False),
    Setting("API_KEY", None, "a key of your own instead of a fresh random one (passed through the environment only)",
            recipe=False, shown="a fresh key"),
)
BY_VAR = {s.var: s for s in SETTINGS}


def below_minimum(value_of: Callable[[Setting], Any]) -> list[Setting]:
    """The settings whose value (`value_of(setting)`, None: not set) is below the least that can work: refused by
    server_generate.py's parser and by the recipe's generate section alike, before any server starts."""
    return [s for s in SETTINGS if s.minimum is not None and (v := value_of(s)) is not None and v < s.minimum]


def default(var: str) -> Any:
    """The default of one setting, for server_generate.py's flags."""
    return BY_VAR[var].default


def readme_table() -> str:
    rows = ["| variable | meaning (default) |", "|---|---|"]
    rows += [f"| `{s.var}` | {s.meaning} ({s.shown_default()}) |" for s in SETTINGS]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv != ["readme"]:
        print("usage: python -m dflashkit.generate.settings readme", file=sys.stderr)
        return 2
    print(readme_table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
