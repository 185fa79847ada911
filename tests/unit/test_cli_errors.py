"""A user's mistake (a bad flag, recipe, override or file) is one line that names it and exit 2, never a traceback:
through `dflashkit COMMAND` and the top-level scripts alike (dflashkit.cli.run_main)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from dflashkit import cli
from dflashkit.recipe import ROOT

DEMO = ROOT / "configs" / "smollm2-demo.yaml"


@pytest.fixture
def bad(tmp_path):
    (tmp_path / "syntax.yaml").write_text("run:\n  dir: [a, b\n")
    return tmp_path


def one_line(capsys, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert all(n in err for n in needles), err
    return err


@pytest.mark.parametrize("argv", [["submit", "--recipe", "{bad}/syntax.yaml"], ["plan", "{bad}/syntax.yaml"],
                                  ["train", "--config", "{bad}/syntax.yaml"]])
def test_a_yaml_syntax_error_names_the_file_and_line(argv, bad, capsys):
    assert cli.main([a.format(bad=bad) for a in argv]) == 2
    one_line(capsys, f"dflashkit {argv[0]}: {bad}/syntax.yaml: line 3, column 1: expected ',' or ']'")


def test_submit_of_a_missing_recipe(bad, capsys):
    assert cli.main(["submit", "--recipe", str(bad / "missing.yaml")]) == 2
    one_line(capsys, "dflashkit submit: ", str(bad / "missing.yaml"), "No such file")


@pytest.mark.parametrize("command", ["submit", "plan"])
def test_a_bad_override_is_one_line(command, bad, capsys):
    recipe = ["--recipe", str(DEMO)] if command == "submit" else [str(DEMO)]
    assert cli.main([command, *recipe, f"run.dir={bad}/run", "dump.num_shards=[1,"]) == 2
    one_line(capsys, f"dflashkit {command}: override 'dump.num_shards=[1,': line 1, column 4")
    assert cli.main([command, *recipe, f"run.dir={bad}/run", "nosuch.key=1"]) == 2
    one_line(capsys, f"dflashkit {command}: unknown key(s) nosuch")


def test_train_config_error_and_missing_dump_dir(bad, capsys):
    assert cli.main(["train", f"output_dir={bad}/t", "target_model=m", f"data.dump_dirs=[{bad}/none]"]) == 2
    one_line(capsys, "dflashkit train: ", "model.mask_token_id must be set")
    assert cli.main(["train", f"output_dir={bad}/t", "target_model=m", "model.mask_token_id=0",
                     f"data.dump_dirs=[{bad}/none]"]) == 2
    one_line(capsys, "dflashkit train: ", f"{bad}/none/meta.json")


def test_a_top_level_script_shares_the_mechanism(bad):
    res = subprocess.run([sys.executable, str(ROOT / "train_dflash.py"), "--config", str(bad / "syntax.yaml")],
                         capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert res.stderr.strip() == (f"train_dflash.py: {bad}/syntax.yaml: line 3, column 1: expected ',' or ']', but got "
                                  "'<stream end>' (while parsing a flow sequence)")
