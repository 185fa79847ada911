"""Online training on the real SmolLM2 (CPU, fp32): generate shards in, the frozen target's states per micro-batch.

The same records go through the HF dump (compute_hidden_states_hf.py's code) once; online must produce the dump's
tokens, masks and states, take the offline run's batches and anchors and give its losses, resume exactly after a
SIGKILL, and split over two gloo processes like one.
"""
from __future__ import annotations

import copy
import gzip
import json
from pathlib import Path

import pytest
import torch

from dflashkit.config import from_dict
from dflashkit.dump import list_dump_records, load_dump_record, read_meta
from dflashkit.dump.run import main as dump_main
from dflashkit.io import safe_id
from dflashkit.prepare import model_dir
from dflashkit.train import data, online
from dflashkit.train.config import TrainConfig
from dflashkit.train.loop import train
from tests.helpers.dumps import bad_records, generated_record, good_records, write_shard
from tests.helpers.train import (
    MASK_TOKEN_ID,
    assert_resumed_as_straight,
    free_port,
    kill_trainer_at_first_checkpoint,
    metrics,
    two_process_worker,
    weights,
    with_overrides,
)

REPO = Path(__file__).resolve().parents[2]
LAYER_IDS = [1, 14, 27]


def sharegpt(rec: dict) -> dict:
    """The same record in the ShareGPT layout (`conversations`: from/value)."""
    out = {k: v for k, v in rec.items() if k != "messages"}
    out["conversations"] = [{"from": {"user": "human", "assistant": "gpt"}.get(m["role"], m["role"]),
                             "value": m["content"]} for m in rec["messages"]]
    return out


@pytest.fixture(scope="module")
def generated(tmp_path_factory, prepared) -> Path:
    """8 generated conversations over two shards, every thinking mode, one shard in the ShareGPT layout."""
    gen = tmp_path_factory.mktemp("gen")
    records = good_records(0, 8)
    write_shard(gen, records[:4], 0, 2)
    write_shard(gen, [sharegpt(r) for r in records[4:]], 1, 2)
    return gen


@pytest.fixture(scope="module")
def hf_dump(generated, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dump")
    assert dump_main(["--backend", "hf", "--model", str(model_dir()), "--input", str(generated), "--output-dir",
                      str(out), "--chat-template", "smollm2-thinking-train", "--max-seq-len", "512", "--dtype",
                      "float32", "--target-layer-ids", ",".join(map(str, LAYER_IDS)), "--no-progress"]) == 0
    return out


ONLINE = {"source": "online", "online": {"inputs": [], "chat_template": "smollm2-thinking-train",
                                         "target_layer_ids": LAYER_IDS}}


def recipe(out: Path, gen: Path | None = None, dump: Path | None = None, **overrides) -> TrainConfig:
    source = copy.deepcopy(ONLINE) if gen else {"dump_dirs": [str(dump)]}
    if gen:
        source["online"]["inputs"] = [str(gen)]
    cfg = {"target_model": str(model_dir()), "output_dir": str(out), "tensorboard": False, "seed": 0,
           "model": {"num_layers": 1, "block_size": 4, "mask_token_id": MASK_TOKEN_ID, "intermediate_size": 256},
           "data": {**source, "max_seq_len": 512, "num_anchors": 8, "micro_batch_size": 2, "num_workers": 0},
           "optim": {"lr": 2e-3, "warmup_steps": 2, "max_steps": 3, "eps": 1e-3},
           "loss": {"decay_gamma": 4.0, "kd_weight": 0.5}, "checkpoint_every": 1000}
    return from_dict(TrainConfig, with_overrides(cfg, overrides))


def test_online_features_equal_the_hf_dump(generated, hf_dump, tmp_path):
    """Same records, same order, same tokens and loss masks (the dump's tokenization, thinking modes replayed), and
    the target's states at the target layers and the pre-norm final state equal the HF dump's: bitwise one record
    at a time (the dump's own shapes), to fp32 summation order in a right-padded micro-batch of 4, whether its rows run
    in one forward or in length groups."""
    source = online.OnlineSource(recipe(tmp_path, gen=generated, data__online__forward_cost_tokens=10**9),
                                 torch.device("cpu"), torch.float32)
    assert source.target.forward_cost == 10**9  # the recipe's data.online.forward_cost_tokens reaches the grouping
    paths = list_dump_records(hf_dump)
    assert [r.id for r in source.records] == [p.stem for p in paths]
    meta = read_meta(hf_dump)
    assert source.meta["target_layer_ids"] == meta["target_layer_ids"] and source.meta["final_state"] == "pre_norm"
    dataset = source.dataset(source.records, 8)
    dumped = [load_dump_record(p, meta) for p in paths]
    for i, rec in enumerate(dumped):
        batch = source.target(data.collate([dataset[(i, 0)]], block_size=4))
        t = rec["input_ids"].shape[0]
        assert batch["conversation_ids"] == [rec["conversation_id"]] and int(batch["length"][0]) == t
        assert torch.equal(batch["input_ids"][0, :t], rec["input_ids"])
        assert torch.equal(batch["loss_mask"][0, :t], rec["loss_mask"])
        assert torch.equal(batch["aux_hidden_states"], rec["aux_hidden_states"])  # packed: the real rows only
        assert torch.equal(batch["hidden_states"], rec["hidden_states"])
    for start, forward_cost in ((0, 10**9), (4, 10**9), (0, 0)):  # one forward; then one per distinct length
        source.target.forward_cost = forward_cost
        batch = source.target(data.collate([dataset[(i, 0)] for i in range(start, start + 4)], block_size=4))
        for row, rec in enumerate(dumped[start:start + 4]):
            t = rec["input_ids"].shape[0]
            for key in ("aux_hidden_states", "hidden_states"):
                diff = (data.padded_features(batch, key)[row, :t] - rec[key]).abs().max() / rec[key].abs().max()
                assert diff < 1e-5, (key, row, float(diff))


def test_online_training_gives_the_offline_losses(generated, hf_dump, tmp_path):
    """The whole trainer, online vs offline on the same records: the same batches and anchors, the same losses."""
    assert train(recipe(tmp_path / "offline", dump=hf_dump), resume=False) == 0
    assert train(recipe(tmp_path / "online", gen=generated), resume=False) == 0
    off, on = metrics(tmp_path / "offline"), metrics(tmp_path / "online")
    for step in (1, 2, 3):
        assert on[step]["tokens"] == off[step]["tokens"] and on[step]["bad_records"] == 0
        assert on[step]["loss"] == pytest.approx(off[step]["loss"], rel=1e-5), step
        assert on[step]["acc_per_pos"] == off[step]["acc_per_pos"]


@pytest.mark.parametrize("source", ["online", "dump"])
def test_grouped_by_length_an_epoch_reads_the_same_records_and_resumes_only_so(generated, hf_dump, tmp_path,
                                                                               source):
    """data.group_by_length from the records' sizes (generate counts or line bytes online, .pt bytes offline): the
    epoch's 8 records, in other batches; the grouping is part of the data position a resume checks."""
    epoch = {"optim__max_steps": 0, "optim__epochs": 1, "checkpoint_every": 2}
    records = {"gen": generated} if source == "online" else {"dump": hf_dump}
    assert train(recipe(tmp_path / "plain", **records, **epoch), resume=False) == 0
    grouped = recipe(tmp_path / "grouped", **records, data__group_by_length=2, **epoch)
    assert train(grouped, resume=False) == 0
    plain, by_length = metrics(tmp_path / "plain"), metrics(tmp_path / "grouped")
    assert sorted(plain) == sorted(by_length) == [1, 2, 3, 4]
    assert sum(r["tokens"] for r in plain.values()) == sum(r["tokens"] for r in by_length.values())
    assert [r["tokens"] for r in plain.values()] != [r["tokens"] for r in by_length.values()]
    with pytest.raises(SystemExit, match="data position"):
        train(recipe(tmp_path / "grouped", **records, **epoch), resume=True)


def test_profile_window_labels_the_online_steps_parts(generated, tmp_path):
    """profile.start / profile.steps: the trace and table of exactly that window (steps 2-3 of 4), with the wait for
    the micro-batch, the step and the target's forward (one micro-batch ahead) labelled once a step; the run's
    losses are untouched."""
    assert train(recipe(tmp_path / "plain", gen=generated, optim__max_steps=4), resume=False) == 0
    assert train(recipe(tmp_path / "run", gen=generated, optim__max_steps=4, profile={"start": 2, "steps": 2}),
                 resume=False) == 0
    table = (tmp_path / "run" / "profile" / "rank0.txt").read_text().splitlines()
    assert table[0].startswith("steps 2-3, rank 0: ")
    parts = {line.split(":")[0]: line for line in table[1:4]}
    assert sorted(parts) == ["online.target_forward", "train.next_batch", "train.step"]
    assert all(": 1 a step, host " in line for line in parts.values())
    with gzip.open(tmp_path / "run" / "profile" / "rank0.json.gz", "rt") as f:
        events = json.load(f)["traceEvents"]
    assert sum(e.get("name") == "train.step" for e in events) == 2
    assert [r["loss"] for r in metrics(tmp_path / "run").values()] == \
        [r["loss"] for r in metrics(tmp_path / "plain").values()]
    with pytest.raises(ValueError, match="profile.steps"):
        recipe(tmp_path / "bad", gen=generated, profile={"start": 1, "steps": 0}).validate()


def test_online_bad_records_are_skipped_counted_and_limited(tmp_path, caplog):
    """Over-length, an empty reply, a missing thinking-mode replay and a torn line: one error line each (with the
    record's id and reason), counted in metrics, training goes on; past data.max_bad_records it stops with one line.
    (Logged once over epochs and remembered across resume: test_train_bad_records.py, the same code path.)"""
    gen = tmp_path / "gen"
    bad = {cid: rec for cid, (rec, _) in bad_records(100).items() if cid in ("bad-long", "bad-empty", "bad-nokwargs")}
    write_shard(gen, good_records(0, 4) + list(bad.values()))
    with open(gen / "shard-00000-of-00001.jsonl", "a") as f:
        f.write('{"id": "torn", "messages": [{"role": "us\n')
    with caplog.at_level("INFO", logger="dflashkit.train.loop"):
        assert train(recipe(tmp_path / "run", gen=gen, optim__max_steps=0, optim__epochs=1), resume=False) == 0
    rows = metrics(tmp_path / "run")
    assert sorted(rows) == [1, 2, 3, 4] and rows[4]["bad_records"] == 4  # 8 records, 4 steps of 2: all read
    lines = sorted(r.getMessage() for r in caplog.records if "skipped bad record" in r.getMessage())
    torn = safe_id("shard-00000-of-00001.jsonl:8")
    assert [line.split()[3].rstrip(":") for line in lines] == sorted([*bad, torn])
    reasons = {line.split()[3].rstrip(":"): line for line in lines}
    assert "too_long" in reasons["bad-long"] and "empty" in reasons["bad-empty"]
    assert "missing_key" in reasons["bad-nokwargs"] and "bad_json" in reasons[torn]
    assert any("done: 4 steps; 4 bad records skipped" in r.getMessage() for r in caplog.records)
    with pytest.raises(SystemExit, match="max_bad_records=1"):
        train(recipe(tmp_path / "limited", gen=gen, data__max_bad_records=1, optim__max_steps=0), resume=False)


def test_online_kill_and_resume_continues_exactly(generated, tmp_path):
    common = {"optim__max_steps": 4}
    assert train(recipe(tmp_path / "straight", gen=generated, **common), resume=False) == 0
    killed = tmp_path / "killed"
    cfg = recipe(killed, gen=generated, checkpoint_every=1, **common)
    args = [f"target_model={cfg.target_model}", f"output_dir={killed}", "tensorboard=false", "model.num_layers=1",
            "model.block_size=4", f"model.mask_token_id={MASK_TOKEN_ID}", "model.intermediate_size=256",
            "data.source=online", f"data.online.inputs=[{generated}]", "data.online.chat_template=smollm2-thinking-train",
            f"data.online.target_layer_ids={LAYER_IDS}", "data.max_seq_len=512", "data.num_anchors=8",
            "data.micro_batch_size=2", "data.num_workers=0", "optim.lr=2e-3", "optim.warmup_steps=2",
            "optim.max_steps=4", "optim.eps=1e-3", "loss.decay_gamma=4.0", "loss.kd_weight=0.5", "checkpoint_every=1"]
    saved = kill_trainer_at_first_checkpoint(args, killed)
    assert saved < 4, "the run finished before it could be killed"
    assert train(cfg, resume=True) == 0
    assert_resumed_as_straight(tmp_path / "straight", killed, range(saved + 1, 5))


def test_two_processes_online_match_one_process_with_ddp_and_fsdp2(generated, tmp_path):
    """Each rank holds its own frozen target and reads its own slice; the steps equal one process's."""
    common = {"optim__max_steps": 2, "data__heldout_records": 2}
    assert train(recipe(tmp_path / "one", gen=generated, **common), resume=False) == 0
    for mode in ("ddp", "fsdp"):
        two = recipe(tmp_path / mode, gen=generated, data__micro_batch_size=1, parallel=mode, **common)
        torch.multiprocessing.spawn(two_process_worker, args=(two, free_port()), nprocs=2)
        for step in (1, 2):
            a, b = metrics(tmp_path / "one")[step], metrics(tmp_path / mode)[step]
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["tokens"] == b["tokens"], mode
        wa, wb = weights(tmp_path / "one"), weights(tmp_path / mode)
        for name in wa:
            torch.testing.assert_close(wa[name], wb[name], atol=2e-6, rtol=1e-4, msg=f"{mode} {name}")
        # scored with those weights (equal to summation order: FSDP2 reduce-scatters the gradients)
        held = [json.loads((tmp_path / run / "heldout.jsonl").read_text()) for run in ("one", mode)]
        assert held[0]["loss"] == pytest.approx(held[1]["loss"], rel=1e-4), mode


def test_index_reads_every_line_of_files_and_dirs(tmp_path):
    """A dir of shards or one file; ids sorted as a dump dir sorts them; a line without an id keeps its place."""
    gen = write_shard(tmp_path / "gen", [generated_record("b", 0, None), generated_record("a-x", 1, None)])
    (gen / "shard-00000-of-00001.jsonl").open("a").write('{"messages": []}\n')
    files, refs = online.index_generated([str(gen)])
    # "a-x.pt" < "b.pt" < "shard-...": a dump dir's order; the id-less line is named by its source
    assert [(r.id, r.lineno) for r in refs] == [("a-x", 2), ("b", 1), (safe_id("shard-00000-of-00001.jsonl:3"), 3)]
    assert files == [gen / "shard-00000-of-00001.jsonl"]
    _, one = online.index_generated([str(gen / "shard-00000-of-00001.jsonl")])
    assert one == refs


def test_record_sizes_are_the_generate_token_counts_else_bytes():
    """data.group_by_length's size of a generated line: its last turn's prompt + completion tokens (the whole
    conversation as served), or, without usable counts, its bytes / 4."""
    raw = b"x" * 400
    counted = {"generation": {"turns": [{"prompt_tokens": 10, "completion_tokens": 5},
                                        {"prompt_tokens": 40, "completion_tokens": 7}]}}
    assert online.record_size(counted, raw) == 47
    for broken in (None, {}, {"generation": None}, {"generation": {"turns": []}},
                   {"generation": {"turns": [{"prompt_tokens": 3, "completion_tokens": None}]}},
                   {"generation": {"turns": ["x"]}}):
        assert online.record_size(broken, raw) == 100


def test_length_groups_trade_padding_against_forwards():
    """Rows sorted longest first and cut where the padding saved pays for another forward; every row once."""
    lengths = [100, 2000, 120, 1900, 110, 2048]
    assert online.length_groups(lengths, forward_cost=10**9) == [[5, 1, 3, 2, 4, 0]]
    assert online.length_groups(lengths, forward_cost=1000) == [[5, 1, 3], [2, 4, 0]]
    assert online.length_groups(lengths, forward_cost=0) == [[5], [1], [3], [2], [4], [0]]
    assert online.length_groups([7], forward_cost=1000) == [[0]]


def test_heldout_inputs_are_the_heldout_set(tmp_path, caplog):
    """data.online.heldout_inputs: every record of those shards is held out and scored, none of the inputs' is."""
    write_shard(tmp_path / "gen", good_records(0, 4))
    write_shard(tmp_path / "heldout", good_records(4, 3))
    run = recipe(tmp_path / "run", gen=tmp_path / "gen", data__online__heldout_inputs=[str(tmp_path / "heldout")],
                 optim__max_steps=0, optim__epochs=1)
    with caplog.at_level("INFO", logger="dflashkit.train.loop"):
        assert train(run, resume=False) == 0
    assert any("data: 4 records" in r.getMessage() and "(3 held out)" in r.getMessage() for r in caplog.records)
    scored = [json.loads(line) for line in (tmp_path / "run" / "heldout.jsonl").read_text().splitlines()]
    assert [row["step"] for row in scored] == [2] and scored[0]["tau"] >= 1.0
    with pytest.raises(ValueError, match="heldout_records must then be 0"):
        recipe(tmp_path / "both", gen=tmp_path / "gen", data__heldout_records=1,
               data__online__heldout_inputs=[str(tmp_path / "heldout")])
