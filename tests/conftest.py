"""Session fixtures: the prepared model and prompts, and one real vLLM (CPU) server shared by the integration tests.

The server is the one `.ci/run` started when DFLASHKIT_TEST_VLLM_URL is set (with its key in
DFLASHKIT_TEST_VLLM_KEY); otherwise the session starts its own with the same command line, once.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from dflashkit import serve
from dflashkit.prepare import prepare
from tests.helpers.server import SERVED_NAME, THINKING_TEMPLATE


@pytest.fixture(scope="session")
def prepared() -> dict[str, Path]:
    return prepare()


@pytest.fixture(scope="session")
def smollm2_dump(prepared) -> Path:
    """A dump dir of 8 SmolLM2 conversations (96-token greedy replies), target layers [1, 14, 27]."""
    from tests.helpers.train import smollm2_dump_dir  # torch and transformers: only for the tests that use it

    return smollm2_dump_dir()


@pytest.fixture(scope="session")
def vllm_server(prepared, tmp_path_factory) -> serve.RunningServer:
    if os.environ.get("DFLASHKIT_TEST_VLLM_URL"):
        yield serve.RunningServer(os.environ["DFLASHKIT_TEST_VLLM_URL"], os.environ["DFLASHKIT_TEST_VLLM_KEY"],
                                  SERVED_NAME, pid=-1)
        return
    log = tmp_path_factory.mktemp("vllm") / "server.log"
    with serve.running_server("vllm", str(prepared["model"]), SERVED_NAME, log, env=serve.CPU_VLLM_ENV, timeout=600,
                              extra_args=serve.CPU_VLLM_ARGS + ["--chat-template", str(THINKING_TEMPLATE)]) as server:
        yield server


@pytest.fixture
def worker_env(prepared):
    """Builds the environment of a real worker.sh run on this CPU box, with overrides."""

    def build(**overrides: str) -> dict[str, str]:
        env = {**os.environ, **serve.CPU_VLLM_ENV,
               "PYTHON": sys.executable,
               "MODEL": str(prepared["model"]),
               "SERVED_MODEL_NAME": SERVED_NAME,
               "SERVER_STARTUP_TIMEOUT": "300",
               "VLLM_SERVE_EXTRA_ARGS": " ".join(serve.CPU_VLLM_ARGS) + f" --chat-template '{THINKING_TEMPLATE}'"}
        env.update(overrides)
        return env

    return build


def pytest_terminal_summary(terminalreporter):
    """Seconds spent per test folder (setup + call + teardown), the figure docs/TESTS.md records per folder."""
    totals: dict[str, float] = {}
    for reports in terminalreporter.stats.values():
        for report in reports:
            nodeid, duration = getattr(report, "nodeid", ""), getattr(report, "duration", None)
            if duration is None or not nodeid.startswith("tests/"):
                continue
            folder = nodeid.split("/")[1]
            totals[folder] = totals.get(folder, 0.0) + duration
    if totals:
        terminalreporter.write_line("test time per folder: " + ", ".join(
            f"{folder} {seconds:.0f} s" for folder, seconds in sorted(totals.items())))
