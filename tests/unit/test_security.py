"""Security review, the parts that need no service: every torch.load is weights_only, a pickle payload in a dump or a
checkpoint is refused without running, ids cannot escape their directory, servers bind 127.0.0.1 by default and never
carry the API key on their command line, and files written atomically are not world-writable whatever the umask."""
from __future__ import annotations

import ast
import os
import stat
from pathlib import Path

import pytest
import torch

from dflashkit import serve
from dflashkit.dump.format import DumpFormatError, load_dump_record
from dflashkit.io import JsonlAppender, atomic_write_json, safe_id

REPO = Path(__file__).resolve().parents[2]
SKIP_DIRS = {".venv", ".cache", ".git", "node_modules", "build", "dist"}


def python_files() -> list[Path]:
    # This file is left out: its one weights_only=False load proves the test payload is live.
    return [p for p in REPO.rglob("*.py")
            if not SKIP_DIRS & set(p.relative_to(REPO).parts) and p.resolve() != Path(__file__).resolve()]


def test_every_torch_load_is_weights_only():
    offenders, seen = [], 0
    for path in python_files():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load"
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"):
                seen += 1
                kw = {k.arg: k.value for k in node.keywords}
                if not (isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True):
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert seen >= 3, "the scan found the known torch.load calls (dump reader, checkpoint loader)"
    assert offenders == [], f"torch.load without weights_only=True: {offenders}"


class _Payload:
    """Unpickling this runs `touch MARKER`: what a hostile .pt file does to a reader that trusts pickle."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_payload_in_a_dump_record_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"input_ids": torch.arange(4), "conversation_id": "evil", "x": _Payload(marker)}, path)
    with pytest.raises(DumpFormatError, match="not a loadable dump record"):
        load_dump_record(path)
    assert not marker.exists()
    # The payload is real: a reader that trusted pickle would have run it.
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_pickle_payload_in_a_checkpoint_is_refused(tmp_path):
    from safetensors.torch import save_file

    from dflashkit.train.checkpoint import load_checkpoint
    from dflashkit.train.distributed import Dist

    marker = tmp_path / "pwned"
    ckpt = tmp_path / "step-00000001"
    ckpt.mkdir()
    model = torch.nn.Linear(2, 2)
    save_file({k: v.detach() for k, v in model.state_dict().items()}, ckpt / "model.safetensors")
    torch.save({"state": {}, "param_groups": [], "x": _Payload(marker)}, ckpt / "optimizer.pt")
    (ckpt / "trainer_state.json").write_text("{}")
    dist = Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    with pytest.raises(Exception, match="(?i)weights.only|unpickl"):
        load_checkpoint(ckpt, model, torch.optim.AdamW(model.parameters()), dist)
    assert not marker.exists()


@pytest.mark.parametrize("raw", ["../x", "../../etc/passwd", "/abs/path", "a/b", "..", ".", ".hidden", "a\0b",
                                 "a\\..\\b", "x" * 1000, "ü/..", "con", " ", "\n"])
def test_safe_id_is_one_component_inside_the_directory(raw, tmp_path):
    sid = safe_id(raw)
    assert sid not in (".", "..") and not sid.startswith(".") and len(sid) <= 128
    assert "/" not in sid and "\\" not in sid and "\0" not in sid
    target = (tmp_path / (sid + ".pt")).resolve()
    assert target.parent == tmp_path.resolve()


def test_safe_id_keeps_distinct_ids_distinct():
    raws = ["a/b", "a_b", "a?b", "a b", "../a_b", "a\0b", "x" * 200, "x" * 201]
    assert len({safe_id(r) for r in raws}) == len(raws)
    assert safe_id("plain-id_1.2") == "plain-id_1.2"


@pytest.mark.parametrize("backend", ["vllm", "sglang"])
def test_servers_bind_loopback_and_take_no_key_on_the_command_line(backend):
    cmd = serve.server_command(backend, "/models/m", 8000, "m", 1, extra_args=["--dtype", "bfloat16"])
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert "--api-key" not in cmd  # the key travels in the server's environment only
    # An operator who wants another interface says so explicitly.
    other = serve.server_command(backend, "/models/m", 8000, "m", 1, host="0.0.0.0")
    assert other[other.index("--host") + 1] == "0.0.0.0"


@pytest.mark.parametrize("extra", ["--host 0.0.0.0", "--host=0.0.0.0", "--port 80", "--api-key k", "--api-key=k"])
def test_extra_args_cannot_override_host_port_or_key(extra):
    with pytest.raises(ValueError, match="worker.sh manages them"):
        serve.split_extra_args(f"--dtype float32 {extra}")


def test_atomic_and_appended_files_are_not_world_writable_under_umask_0(tmp_path):
    old = os.umask(0)
    try:
        atomic_write_json(tmp_path / "marker.json", {"a": 1})
        with JsonlAppender(tmp_path / "out.jsonl") as out:
            out.write({"id": "x"})
    finally:
        os.umask(old)
    for name in ("marker.json", "out.jsonl"):
        mode = stat.S_IMODE((tmp_path / name).stat().st_mode)
        assert not mode & stat.S_IWOTH and not mode & stat.S_IWGRP, (name, oct(mode))
