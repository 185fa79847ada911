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
    assert cli.main(["train", f"output_dir={bad}/t", f"target_model={bad}/none", "model.mask_token_id=0",
                     f"data.dump_dirs=[{bad}/none]"]) == 2
    one_line(capsys, "dflashkit train: ", f"target_model {bad}/none: no config.json there")
    (bad / "target").mkdir()
    (bad / "target" / "config.json").write_text("{}")
    assert cli.main(["train", f"output_dir={bad}/t", f"target_model={bad}/target", "model.mask_token_id=0",
                     f"data.dump_dirs=[{bad}/none]"]) == 2
    one_line(capsys, "dflashkit train: ", f"{bad}/none/meta.json")


def test_train_of_a_missing_recipe(bad, capsys):
    assert cli.main(["train", "--config", str(bad / "missing.yaml")]) == 2
    one_line(capsys, f"dflashkit train: {bad}/missing.yaml: No such file or directory")


@pytest.mark.parametrize("override, message", [
    ("data.heldout_records=8", "data.heldout_records=8 leaves none of the 8 records for training"),
    ("data.micro_batch_size=16", "8 records are fewer than one global batch of 16"),
    ("model.mask_token_id=49152", "model: mask_token_id 49152 is not below vocab_size 49152"),
])
def test_a_recipe_that_does_not_fit_the_data_or_target_is_one_line(override, message, smollm2_dump, prepared,
                                                                    bad, capsys):
    """Checks made once the dump and target are read (not by the recipe's own validation) are the user's mistake
    too: one line and exit 2, before anything is trained or written."""
    assert cli.main(["train", f"output_dir={bad}/t", f"target_model={prepared['model']}", "model.mask_token_id=16",
                     f"data.dump_dirs=[{smollm2_dump}]", "data.num_workers=0", override]) == 2
    one_line(capsys, "dflashkit train: ", message)
    assert not (bad / "t").exists()


def test_an_empty_dump_dir_stops_the_stage(smollm2_dump, prepared, bad, caplog, capsys):
    """Nothing to train on is the stage's failure (exit 1, one log line), as in the dump and generate stages."""
    empty = bad / "empty"
    empty.mkdir()
    (empty / "meta.json").write_text((smollm2_dump / "meta.json").read_text())
    assert cli.main(["train", f"output_dir={bad}/t", f"target_model={prepared['model']}", "model.mask_token_id=16",
                     f"data.dump_dirs=[{empty}]"]) == 1
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == [
        f"train stopped: dump dir {empty} holds no records"]
    assert "Traceback" not in capsys.readouterr().err


def test_dump_flags_that_do_not_fit_the_model(prepared, bad, capsys):
    (bad / "in.jsonl").write_text('{"id": "a", "conversations": [{"from": "human", "value": "hi"}]}\n')
    for flag, message in ((["--target-layer-ids", "1,99"], "target layer ids [1, 99] must lie in [0, 28]"),
                          (["--num-draft-layers", "40"], "40 target layers do not fit the spread [1, 27]"),
                          (["--chat-template", "no-such-template"], "--chat-template: chat template 'no-such"),
                          (["--batch-size", "0"], "--batch-size must be >= 1"),
                          (["--num-shards", "0"], "--num-shards must be >= 1")):
        try:
            code = cli.main(["dump", "--backend", "hf", "--model", str(prepared["model"]), "--input",
                             str(bad / "in.jsonl"), "--output-dir", str(bad / "dump"), *flag])
        except SystemExit as e:  # argparse's own refusal
            code = e.code
        assert code == 2
        assert message in capsys.readouterr().err.strip().splitlines()[-1]
        assert not (bad / "dump").exists()


@pytest.mark.parametrize("argv, message", [
    (["dump", "--backend", "hf", "--model", "{bad}/none", "--input", "{bad}/in.jsonl", "--output-dir", "{bad}/d"],
     "--model {bad}/none: no such file or directory"),
    (["eval", "--draft", "{bad}/none", "--target", "{bad}/none", "--out", "{bad}/e", "--mtbench", "{bad}/in.jsonl"],
     "--target {bad}/none: no such file or directory"),
    (["plan", "--model", "{bad}/none", "--mean-tokens", "100"], "--model {bad}/none: no such file or directory"),
    (["check-template", "--tokenizer", "{bad}/none"], "--tokenizer {bad}/none: no such file or directory"),
])
def test_a_model_path_that_is_not_there_is_named(argv, message, bad, caplog, capsys):
    """A user's mistake (exit 2), not HF's word that '/path' is a malformed hub id."""
    (bad / "in.jsonl").write_text('{"id": "a", "conversations": [{"from": "human", "value": "hi"}]}\n')
    assert cli.main([a.format(bad=bad) for a in argv]) == 2
    said = [capsys.readouterr().err.strip()] + [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any(message.format(bad=bad) in line for line in said), said


@pytest.mark.parametrize("flag", [["--max-tokens", "0"], ["--concurrency", "0"], ["--max-retries", "-1"]])
def test_generate_refuses_counts_no_server_could_serve(flag, bad, capsys):
    """Refused before a request is sent: a server would answer each with an error, retried as if it were its own."""
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", "--model", "m", "--input", str(bad / "syntax.yaml"), "--output-dir", str(bad / "g"),
                  "--base-url", "http://127.0.0.1:9/v1", *flag])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("server_generate.py: error: " + flag[0])
    assert not (bad / "g").exists()


def test_a_top_level_script_shares_the_mechanism(bad):
    res = subprocess.run([sys.executable, str(ROOT / "train_dflash.py"), "--config", str(bad / "syntax.yaml")],
                         capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert res.stderr.strip() == (f"train_dflash.py: {bad}/syntax.yaml: line 3, column 1: expected ',' or ']', but got "
                                  "'<stream end>' (while parsing a flow sequence)")


@pytest.mark.parametrize("override, message", [
    ("data.online.tokenizer={bad}/none", "data.online.tokenizer {bad}/none: no such file or directory"),
    ("data.online.chat_template=no-such-template", "data.online.chat_template: chat template 'no-such-template'"),
    ("data.online.target_layer_ids=[1,99]", "data.online: target layer ids [1, 99] must lie in [0, 28]"),
])
def test_online_settings_that_do_not_fit_are_one_line(override, message, prepared, bad, capsys):
    (bad / "gen").mkdir()
    (bad / "gen" / "shard-00000-of-00001.jsonl").write_text(
        '{"id": "a", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "Hello."}]}\n')
    assert cli.main(["train", f"output_dir={bad}/t", f"target_model={prepared['model']}", "model.mask_token_id=16",
                     "data.source=online", f"data.online.inputs=[{bad}/gen]", override.format(bad=bad)]) == 2
    one_line(capsys, "dflashkit train: ", message.format(bad=bad))


@pytest.mark.parametrize("flag, message", [(["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
                                           (["--limit", "-1"], "--limit must be >= 1"),
                                           (["--sampling-temperature", "-1"], "--sampling-temperature must be >= 0")])
def test_eval_refuses_an_eval_of_nothing(flag, message, bad, capsys):
    """Refused before the target loads: --max-new-tokens 0 used to report 'tau n/a' and exit 0."""
    with pytest.raises(SystemExit) as e:
        cli.main(["eval", "--draft", str(bad), "--target", str(bad), "--out", str(bad / "e"), *flag])
    assert e.value.code == 2 and capsys.readouterr().err.strip().endswith(message)


@pytest.mark.parametrize("override, message", [
    ("optim.lr=-1", "optim: lr and eps must be > 0"), ("optim.weight_decay=-0.1", "weight_decay >= 0"),
    ("optim.min_lr_ratio=2", "0 <= min_lr_ratio <= 1"), ("optim.betas=[0.9,1.5]", "optim.betas must be two values"),
    ("data.max_seq_len=1", "data.max_seq_len at least 2"),
])
def test_train_values_the_optimizer_or_data_cannot_take(override, message, bad, capsys):
    """Refused with the recipe (AdamW's own refusal came as a traceback after the model was built)."""
    assert cli.main(["train", f"output_dir={bad}/t", "target_model=m", "model.mask_token_id=0",
                     f"data.dump_dirs=[{bad}/none]", override]) == 2
    one_line(capsys, "dflashkit train: ", message)


@pytest.mark.parametrize("override, message", [
    ("dump.args.batch_size=0", "dump.args: not valid flags of the dump script"),
    ("dump.args.no_such_flag=1", "dump.args: not valid flags of the dump script"),
    ("eval.args.max_new_tokens=0", "eval.args: not valid flags of `dflashkit eval`"),
    ("generate.max_tokens=0", "generate.max_tokens must be >= 1"),
    ("generate.tp_size=0", "generate.tp_size must be >= 1"),
])
def test_submit_refuses_what_a_later_stage_would(override, message, bad, capsys):
    """A dump flag, eval flag or generate value that its stage refuses is refused at submit, not after the stages
    before it have run for hours (the stage's own parser says why above the line)."""
    assert cli.main(["submit", "--recipe", str(DEMO), "--dry-run", "--stages", "generate,dump,train,eval",
                     f"run.dir={bad}/run", override]) == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (bad / "run").exists()
