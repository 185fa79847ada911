"""Unreadable dump records (issue 20, item 2): a truncated .pt and a file of random bytes in a real SmolLM2 dump.

Training skips each with one error line (file, reason), counts them in metrics, the checkpoint and the final summary,
and goes on; a resumed run knows them and does not log them again; past data.max_bad_records it stops with one
line. `dflashkit check-dump` finds the same two before a run.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from dflashkit.cli import main as cli
from dflashkit.dump import list_dump_records
from dflashkit.train.loop import train
from tests.helpers.train import metrics, recipe


@pytest.fixture
def damaged(smollm2_dump, tmp_path):
    dump = tmp_path / "dump"
    shutil.copytree(smollm2_dump, dump)
    paths = list_dump_records(dump)
    truncated, garbage = paths[2], paths[5]
    truncated.write_bytes(truncated.read_bytes()[:1000])
    garbage.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
                        .numpy().tobytes())
    return dump, {truncated.stem, garbage.stem}


def skipped(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipped bad record")]


def test_bad_records_are_skipped_counted_and_remembered_across_resume(damaged, tmp_path, caplog):
    dump, bad = damaged
    cfg = recipe(dump, tmp_path / "run", optim__epochs=2, checkpoint_every=2)  # 8 records, 2 steps per epoch
    with caplog.at_level("INFO", logger="dflashkit.train.loop"):
        assert train(cfg, resume=False) == 0
    lines = skipped(caplog)
    assert sorted(line.split()[3].rstrip(":") for line in lines) == sorted(bad)  # once each, over two epochs
    assert all("not a loadable dump record" in line and str(dump) in line for line in lines)
    rows = metrics(tmp_path / "run")
    assert sorted(rows) == [1, 2, 3, 4] and rows[4]["bad_records"] == 2
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows.values())
    state = json.loads((tmp_path / "run" / "checkpoints" / "step-00000004" / "trainer_state.json").read_text())
    assert len(state["bad_records"]) == 2
    assert any("done: 4 steps; 2 bad records skipped" in r.getMessage() for r in caplog.records)

    caplog.clear()
    more = recipe(dump, tmp_path / "run", optim__epochs=3, checkpoint_every=2)
    with caplog.at_level("INFO", logger="dflashkit.train.loop"):
        assert train(more, resume=True) == 0  # the same records again: no death, no second error line
    assert skipped(caplog) == [] and metrics(tmp_path / "run")[6]["bad_records"] == 2


def test_past_max_bad_records_training_stops_with_one_line(damaged, tmp_path):
    dump, _ = damaged
    with pytest.raises(SystemExit, match=r"2 bad records, more than data.max_bad_records=1"):
        train(recipe(dump, tmp_path / "run", data__max_bad_records=1, optim__epochs=1), resume=False)


def test_check_dump_lists_the_bad_records(damaged, smollm2_dump, tmp_path, capsys):
    dump, bad = damaged
    assert cli(["check-dump", str(smollm2_dump), "--workers", "2"]) == 0
    assert capsys.readouterr().out.strip().endswith("8 records, 8 readable, 0 bad")
    assert cli(["check-dump", str(dump), "--workers", "2"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 3 and out[-1] == f"{dump}: 8 records, 6 readable, 2 bad"
    assert sorted(next(b for b in bad if f"/{b}.pt:" in line) for line in out[:2]) == sorted(bad)
    (tmp_path / "empty").mkdir()
    assert cli(["check-dump", str(tmp_path / "empty")]) == 2
    assert "meta.json" in capsys.readouterr().err
