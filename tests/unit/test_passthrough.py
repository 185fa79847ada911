"""Server flag passthroughs carry any value verbatim: VLLM_SERVE_EXTRA_ARGS / SGLANG_SERVE_EXTRA_ARGS through
worker.sh, the recipe's `*_serve_extra_args`, `dflashkit eval --vllm-extra-args` (typed, or from the recipe's
eval.args) and `python -m dflashkit.serve command --extra-args`. A one-word value that starts with a dash
(`--enforce-eager`, `--max-model-len=2048`) is where argparse used to stop with `expected one argument`.

worker.sh runs for real up to the server start, with stand-in `vllm` and `sglang` packages first on PYTHONPATH that
record the argv they were started with and exit."""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from dflashkit import serve
from dflashkit.eval import run as eval_run
from dflashkit.plan import eval_command
from dflashkit.recipe import ROOT, load_recipe
from dflashkit.stages import stage_job

DEMO = ROOT / "configs" / "smollm2-demo.yaml"
VALUES = ["--enforce-eager", "--max-model-len=2048", "--dtype float32 --enforce-eager",
          "--chat-template '/a dir/t.jinja' --max-model-len 4096"]
IDS = ["one-word", "k=v", "multi-word", "quoted"]
RECORD = "import json, os, sys\njson.dump(sys.argv[1:], open(os.environ['FAKE_ARGV'], 'w'))\nsys.exit(1)\n"


@pytest.fixture(scope="module")
def fake_servers(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fake")
    for module in ("vllm/entrypoints/openai/api_server.py", "sglang/launch_server.py"):
        path = root / module
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(RECORD)
        for package in path.relative_to(root).parents[:-1]:
            (root / package / "__init__.py").touch()
    return root


@pytest.mark.parametrize("value", VALUES, ids=IDS)
@pytest.mark.parametrize("backend", ["vllm", "sglang"])
def test_worker_passes_server_extra_args_verbatim(backend, value, fake_servers, tmp_path):
    record = tmp_path / "argv.json"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}, "PYTHON": sys.executable,
           "PYTHONPATH": os.pathsep.join([str(fake_servers), str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "FAKE_ARGV": str(record), "BACKEND": backend, "MODEL": "m", "INPUT": str(tmp_path / "in.jsonl"),
           "OUTPUT_DIR": str(tmp_path / "out"), f"{backend.upper()}_SERVE_EXTRA_ARGS": value}
    res = subprocess.run(["bash", str(ROOT / "worker.sh")], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=120, check=False)
    assert "could not build the server command" not in res.stderr, res.stderr[-2000:]
    assert res.returncode == 1 and "did not come up" in res.stderr, res.stderr[-2000:]  # the stand-in exits 1
    argv = json.loads(record.read_text())
    if backend == "sglang":
        assert argv[-2] == "--api-key"  # added in-process from the environment by sglang-launch
        argv = argv[:-2]
    assert argv[-len(shlex.split(value)):] == shlex.split(value)


@pytest.mark.parametrize("value", VALUES, ids=IDS)
def test_serve_command_takes_a_dash_led_value_in_either_form(value, capsys):
    common = ["command", "--backend", "vllm", "--model", "/m", "--served-model-name", "n", "--port", "1"]
    for form in (["--extra-args", value], [f"--extra-args={value}"]):
        assert serve.main(common + form) == 0
        assert capsys.readouterr().out.split("\0")[-1 - len(shlex.split(value)):-1] == shlex.split(value)


@pytest.mark.parametrize("value", VALUES, ids=IDS)
def test_recipe_serve_extra_args_reach_worker_verbatim(value, tmp_path):
    for backend in ("vllm", "sglang"):
        r = load_recipe(DEMO, [f"run.dir={tmp_path}", f"generate.backend={backend}",
                               f"generate.{backend}_serve_extra_args={value}"])
        assert stage_job(r, r.run_dir(), "generate").env[f"{backend.upper()}_SERVE_EXTRA_ARGS"] == value


@pytest.mark.parametrize("value", VALUES, ids=IDS)
def test_eval_vllm_extra_args_typed_or_from_the_recipe(value, monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(eval_run, "evaluate", lambda args: seen.append(args.vllm_extra_args) or 0)
    assert eval_run.main(["--draft", "d", "--target", "t", "--out", "o", "--vllm", "--vllm-extra-args", value]) == 0
    assert eval_run.main(["--draft", "d", "--target", "t", "--out", "o", f"--vllm-extra-args={value}"]) == 0
    cmd = eval_command(load_recipe(DEMO, [f"run.dir={tmp_path}", f"eval.args.vllm_extra_args={value}"]))
    assert eval_run.main(cmd[2:]) == 0  # what `submit` runs for the eval stage
    assert seen == [value] * 3
