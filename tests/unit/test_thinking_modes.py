"""THINKING_MODES is checked before anything runs: a name the templates do not know (and the map does not map) is
refused by the client's parser, and worker.sh stops on that refusal before it starts a server."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from dflashkit.generate.run import parse_args
from dflashkit.recipe import ROOT

BASE = ["--input", "in.jsonl", "--output-dir", "out", "--model", "m", "--base-url", "http://127.0.0.1:1/v1"]


@pytest.mark.parametrize("modes,extra", [("enabled,disabled,adaptive", []), ("enabled,enabled,disabled", []),
                                         ("low,high", ["--thinking-mode-map", '{"low": "low", "high": "high"}'])])
def test_known_or_mapped_modes_pass(modes, extra):
    assert parse_args([*BASE, "--thinking-modes", modes, *extra]).thinking_modes == modes.split(",")


@pytest.mark.parametrize("modes,extra", [("enabeld", []), ("enabled,Disabled", []),
                                         ("low,high", ["--thinking-mode-map", '{"low": "low"}'])])
def test_unknown_modes_are_refused(modes, extra, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args([*BASE, "--thinking-modes", modes, *extra])
    assert e.value.code == 2 and "--thinking-modes: unknown mode(s)" in capsys.readouterr().err


def test_worker_refuses_unknown_modes_before_starting_a_server(tmp_path):
    # BACKEND=sglang (not installed here) would die at once if worker.sh got as far as starting it.
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}, "PYTHON": sys.executable,
           "BACKEND": "sglang", "MODEL": "m", "INPUT": str(tmp_path / "in.jsonl"), "OUTPUT_DIR": str(tmp_path / "out"),
           "THINKING_MODES": "enabled,disabeld"}
    res = subprocess.run(["bash", str(ROOT / "worker.sh")], env=env, capture_output=True, text=True, timeout=120,
                         check=False)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "unknown mode(s) 'disabeld'" in res.stderr and "no server started" in res.stderr
    assert "starting sglang server" not in res.stderr


def test_a_recipe_with_an_unknown_mode_is_refused_when_it_loads():
    from dflashkit.config import ConfigError
    from dflashkit.recipe import load_recipe

    demo = ROOT / "configs" / "smollm2-demo.yaml"
    with pytest.raises(ConfigError, match="generate.thinking_modes: unknown mode.s. 'disabeld'"):
        load_recipe(demo, ["generate.thinking_modes=[enabled, disabeld]"])
    load_recipe(demo, ["generate.thinking_modes=[low]", "generate.thinking_mode_map={low: 0}"])
