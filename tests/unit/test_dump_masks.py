"""The dump with each mask source (HF backend, real SmolLM2 forward passes): the training template's generation spans
and the replies located in the model template's rendering give the same records and train to the same first-step
loss; meta.json says which source was used; a reply the template rewrites beyond recognition is that record's error,
counted like the dump's other bad records."""
import json

from dflashkit.config import from_dict
from dflashkit.dump import list_dump_records, load_dump_record, read_meta
from dflashkit.dump.run import main as dump_main
from dflashkit.prepare import model_dir
from dflashkit.templates import read_template
from dflashkit.train.config import TrainConfig
from dflashkit.train.loop import train
from tests.helpers.dumps import good_records, write_shard
from tests.helpers.train import MASK_TOKEN_ID


def dump(gen, out, template):
    assert dump_main(["--model", str(model_dir()), "--input", str(gen), "--output-dir", str(out), "--chat-template",
                      str(template), "--max-seq-len", "512", "--num-draft-layers", "3", "--no-progress"],
                     backend="hf") == 0
    return read_meta(out)


def first_step_loss(dump_dir, out) -> float:
    cfg = from_dict(TrainConfig, {
        "target_model": str(model_dir()), "output_dir": str(out), "tensorboard": False, "seed": 0,
        "model": {"num_layers": 1, "block_size": 4, "mask_token_id": MASK_TOKEN_ID, "intermediate_size": 128},
        "data": {"dump_dirs": [str(dump_dir)], "num_anchors": 8, "micro_batch_size": 2, "num_workers": 0},
        "optim": {"lr": 1e-3, "warmup_steps": 0, "max_steps": 1}, "checkpoint_every": 1000})
    assert train(cfg, resume=False) == 0
    return json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["loss"]


def test_both_mask_sources_give_the_same_records_and_first_step_loss(tmp_path):
    # three user turns with a system turn (disabled), one with a think block the model opened itself (adaptive); the
    # masks of every mode are compared token for token in test_template_check.py, without forward passes
    gen = write_shard(tmp_path / "generate", good_records(1, 2))
    spans = dump(gen, tmp_path / "spans", "smollm2-thinking-train")
    located = dump(gen, tmp_path / "located", "smollm2-thinking")
    assert (spans["mask_source"], spans["end_of_turn"]) == ("generation_spans", None)
    assert (located["mask_source"], located["end_of_turn"]) == ("located_replies", "<|im_end|>")
    assert spans["counts"]["written"] == located["counts"]["written"] == 2
    for path in list_dump_records(tmp_path / "spans"):
        a, b = load_dump_record(path), load_dump_record(tmp_path / "located" / path.name)
        assert a["input_ids"].tolist() == b["input_ids"].tolist() and a["loss_mask"].tolist() == b["loss_mask"].tolist()
    losses = [first_step_loss(tmp_path / name, tmp_path / f"train-{name}") for name in ("spans", "located")]
    assert losses[0] == losses[1] and losses[0] > 0


def test_an_unlocatable_reply_is_an_error_line(tmp_path):
    """A template that rewrites one answer ("pears" -> "plums", turn 1 of the 3-turn records): those records cannot be
    masked and get one error line each, counted as errors; the shard finishes (no record left, so no forward pass)."""
    gen = write_shard(tmp_path / "generate", [good_records(1, 1)[0], good_records(3, 1)[0]])
    rewriting = tmp_path / "rewriting.jinja"
    rewriting.write_text(read_template("smollm2-thinking").replace(
        "message['content']", "message['content'] | replace('pears', 'plums')"))
    meta = dump(gen, tmp_path / "dump", rewriting)
    assert meta["counts"] == {"input": 2, "written": 0, "skipped": 0, "errors": 2, "resumed": 0}
    lines = [json.loads(x) for x in (tmp_path / "dump" / "shard-00000-of-00001.errors.jsonl").read_text().splitlines()]
    assert {x["id"]: (x["kind"], x["reason"]) for x in lines} == {
        "conv-1": ("error", "reply_not_found"), "conv-3": ("error", "reply_not_found")}
    assert all(x["detail"].startswith("assistant turn 1:") for x in lines)
