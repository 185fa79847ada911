"""Shell injection: every variable worker.sh and slurm/*.sbatch read from the environment, and the arguments they pass
on, set to text that would run `touch NAME` if it were ever evaluated: command substitution, backticks, `;`, `&&`,
`|`, and bash arithmetic's own trap (`a[$(cmd)]`, which `$((VAR + 1))` runs). Nothing may be created.

The scripts run for real, as far as they get without a GPU: worker.sh with BACKEND=sglang (not installed here, so the
server dies at once and the worker fails the way it does when a server cannot start), after expanding every variable
into the server command and the client's argument array. PYTHON and TRAIN_ENTRY are left out on purpose: they name the
program to run. VLLM_SERVE_EXTRA_ARGS against a real vLLM parser is in tests/integration/test_generate.py.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
WORKER = REPO / "worker.sh"
SLURM = REPO / "slurm"

WORKER_FREE_VARS = [
    "MODEL", "INPUT", "OUTPUT_DIR", "API_KEY", "SERVED_MODEL_NAME", "SERVER_STARTUP_TIMEOUT", "SGLANG_SERVE_EXTRA_ARGS",
    "VLLM_SERVE_EXTRA_ARGS", "LOG_DIR", "NUM_SHARDS", "THINKING_MODES", "THINKING_MODE_KEY", "THINKING_MODE_MAP",
    "CHAT_TEMPLATE_KWARGS", "THINK_OPEN_TAG", "THINK_CLOSE_TAG", "OUTPUT_FORMAT", "ON_LENGTH", "TEMPERATURE", "TOP_P",
    "MAX_TOKENS", "SEED", "CONCURRENCY", "MAX_CONVERSATIONS", "SYSTEM_PROMPT", "REQUEST_TIMEOUT", "MAX_RETRIES",
    "DFLASHKIT_ROOT", "SLURM_SUBMIT_DIR", "CUDA_VISIBLE_DEVICES",
]
# Typed or checked by server_generate.py's parser: a hostile value is refused by the client's argument check, which
# worker.sh runs before it starts any server.
CLIENT_CHECKED_VARS = {"NUM_SHARDS", "THINKING_MODES", "THINKING_MODE_MAP", "CHAT_TEMPLATE_KWARGS", "OUTPUT_FORMAT",
                       "ON_LENGTH", "TEMPERATURE", "TOP_P", "MAX_TOKENS", "SEED", "CONCURRENCY", "MAX_CONVERSATIONS",
                       "REQUEST_TIMEOUT", "MAX_RETRIES"}
# Checked by the script before any use; each must be refused with its own message.
WORKER_CHECKED_VARS = {"BACKEND": "BACKEND must be", "TP_SIZE": "TP_SIZE must be",
                       "SERVERS_PER_NODE": "SERVERS_PER_NODE must be", "PORT_BASE": "PORT_BASE must be",
                       "SHARD_ID": "SHARD_ID / SLURM_ARRAY_TASK_ID must be",
                       "SLURM_ARRAY_TASK_ID": "SHARD_ID / SLURM_ARRAY_TASK_ID must be"}


def hostile(name: str) -> str:
    """One value holding every way a shell could be tricked into running `touch <name>.<n>` (relative to the cwd)."""
    return (f"$(touch {name}.1) `touch {name}.2` ; touch {name}.3 && touch {name}.4 | touch {name}.5 "
            f"'$(touch {name}.6)' \"$(touch {name}.7)\"")


def arithmetic(name: str) -> str:
    return f"PATH[$(touch {name}.8)]"  # a set array name: `set -u` would stop an unset one first


def run(script: Path, env: dict[str, str], cwd: Path, *args: str, timeout: int = 120):
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return subprocess.run(["bash", str(script), *args], env={**base, "PYTHON": sys.executable, **env}, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, check=False)


def created(cwd: Path) -> list[str]:
    """Files a payload created: `<NAME>.<n>` anywhere under the cwd (directories named after the text don't count)."""
    return sorted(str(p.relative_to(cwd)) for p in cwd.rglob("*") if p.is_file() and p.name.split(".")[-1].isdigit()
                  and p.name.rsplit(".", 1)[0].isupper())


@pytest.mark.parametrize("make", [hostile, arithmetic], ids=["substitution", "arithmetic"])
def test_worker_free_vars_and_args_never_run(make, tmp_path):
    env = {name: make(name) for name in WORKER_FREE_VARS if name not in CLIENT_CHECKED_VARS}
    env["BACKEND"] = "sglang"
    res = run(WORKER, env, tmp_path, "--", "--system-prompt", make("ARGV2"))
    assert res.returncode != 0
    # It went all the way: client args built, --check-done asked, a server launched (and it died: no sglang here).
    assert "starting sglang server 0" in res.stderr and "did not come up" in res.stderr, res.stderr[-2000:]
    # The client's parser refuses the rest (and a stray argument), seen verbatim: no server is started for them.
    refused = run(WORKER, {**env, **{name: make(name) for name in CLIENT_CHECKED_VARS}}, tmp_path, "--", make("ARGV"))
    assert refused.returncode == 2 and "no server started" in refused.stderr, refused.stderr[-2000:]
    assert "starting sglang server" not in refused.stderr
    assert created(tmp_path) == []


@pytest.mark.parametrize("name", sorted(WORKER_CHECKED_VARS))
@pytest.mark.parametrize("make", [hostile, arithmetic], ids=["substitution", "arithmetic"])
def test_worker_checked_vars_are_refused_before_use(name, make, tmp_path):
    env = {"MODEL": "m", "INPUT": "in", "OUTPUT_DIR": "out", name: make(name)}
    res = run(WORKER, env, tmp_path)
    assert res.returncode == 1 and WORKER_CHECKED_VARS[name] in res.stderr, res.stderr[-2000:]
    assert created(tmp_path) == []


@pytest.mark.parametrize("model", ["/no/such/model", "./no-such-model", "~/no-such-model"])
def test_worker_names_a_model_path_that_is_not_there(model, tmp_path):
    """Before any server starts (whose traceback would call the path a malformed hub id); a hub id goes on."""
    res = run(WORKER, {"MODEL": model, "INPUT": "in", "OUTPUT_DIR": "out", "HOME": str(tmp_path)}, tmp_path)
    assert res.returncode == 1 and res.stderr.strip() == f"worker.sh: MODEL {model}: no such file or directory"
    hub = run(WORKER, {"MODEL": "org/model", "INPUT": "in", "OUTPUT_DIR": "out", "BACKEND": "sglang"}, tmp_path)
    assert "starting sglang server 0" in hub.stderr, hub.stderr[-2000:]


def test_generate_sbatch(tmp_path):
    env = {name: hostile(name) for name in WORKER_FREE_VARS if name != "DFLASHKIT_ROOT"}
    env.update(DFLASHKIT_ROOT=str(REPO), BACKEND="sglang", SHARD_ID="0")
    res = run(SLURM / "generate.sbatch", env, tmp_path, hostile("ARGV"))
    assert res.returncode == 2 and "no server started" in res.stderr, res.stderr[-2000:]  # the client saw it verbatim
    assert created(tmp_path) == []
    bad_shard = run(SLURM / "generate.sbatch", {"DFLASHKIT_ROOT": str(REPO), "NUM_SHARDS": "2", "MODEL": "m",
                                                 "INPUT": "i", "OUTPUT_DIR": "o",
                                                 "SLURM_ARRAY_TASK_ID": arithmetic("TASK")}, tmp_path)
    assert bad_shard.returncode == 1 and "must be a non-negative integer" in bad_shard.stderr
    assert created(tmp_path) == []


@pytest.mark.parametrize("make", [hostile, arithmetic], ids=["substitution", "arithmetic"])
def test_dump_sbatch(make, tmp_path):
    env = {name: make(name) for name in ("MODEL", "INPUT", "OUTPUT_DIR", "NUM_SHARDS", "SHARD_ID")}
    env.update(DFLASHKIT_ROOT=str(REPO), DUMP_BACKEND="hf")
    res = run(SLURM / "dump.sbatch", env, tmp_path, make("ARGV"))
    assert res.returncode == 2 and "invalid int value" in res.stderr, res.stderr[-2000:]  # argparse saw it verbatim
    bad_backend = run(SLURM / "dump.sbatch", {**env, "DUMP_BACKEND": make("DUMP_BACKEND")}, tmp_path)
    assert bad_backend.returncode == 2 and "does not exist" in bad_backend.stderr
    assert created(tmp_path) == []


def test_train_sbatch_local(tmp_path):
    entry = tmp_path / "entry.py"
    entry.write_text("import sys; print('ARGS', sys.argv[1:])\n")
    marker = tmp_path / "done $(touch DONE.1) `touch DONE.2`;touch DONE.3.json"
    env = {"TRAIN_ENTRY": str(entry), "NPROC_PER_NODE": "1", "DONE_MARKER": str(marker),
           "TORCH_NCCL_ASYNC_ERROR_HANDLING": hostile("NCCL"), "RDZV_PORT": hostile("RDZV_PORT")}
    res = run(SLURM / "train.sbatch", env, tmp_path, hostile("ARGV"), timeout=180)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"ARGS {[hostile('ARGV')]!r}" in res.stdout  # the argument arrived as one word, unexpanded
    assert marker.exists()  # the marker is written under its literal name
    bad_nproc = run(SLURM / "train.sbatch", {**env, "NPROC_PER_NODE": hostile("NPROC")}, tmp_path, timeout=180)
    assert bad_nproc.returncode != 0
    assert created(tmp_path) == []


def test_train_sbatch_job_id_is_checked_before_arithmetic(tmp_path):
    entry = tmp_path / "entry.py"
    entry.write_text("pass\n")
    env = {"TRAIN_ENTRY": str(entry), "SLURM_JOB_ID": arithmetic("JOBID"), "SLURM_JOB_NODELIST": "localhost",
           "SLURM_NNODES": "1"}
    res = run(SLURM / "train.sbatch", env, tmp_path)
    assert res.returncode == 2 and "SLURM_JOB_ID" in res.stderr, res.stderr[-2000:]
    assert created(tmp_path) == []
