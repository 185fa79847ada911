"""Disk planning: the MiniMax-M3 figure T*(n+1)*H*2 and the CLI on a real config."""
import json

from dflashkit.dump.plan import PER_FILE_OVERHEAD, dump_bytes, main
from dflashkit.prepare import model_dir


def test_minimax_m3_sample_is_about_604_mb():
    payload = 8192 * (5 + 1) * 6144 * 2
    assert payload == 603_979_776
    got = dump_bytes(8192, 6144, 5, "bfloat16")
    assert got == payload + 8192 * 9 + PER_FILE_OVERHEAD  # + int64 ids and uint8 mask per token
    assert round(got / 1e6) == 604


def test_cli_reads_the_model_config(capsys):
    assert main(["--model", str(model_dir()), "--dtype", "float32", "--mean-tokens", "100",
                 "--num-conversations", "10"]) == 0
    plan = json.loads(capsys.readouterr().out.rsplit("}", 1)[0] + "}")
    assert plan["hidden_size"] == 576 and plan["target_layer_ids"] == [1, 8, 14, 20, 27]
    assert plan["bytes_per_token"] == 6 * 576 * 4 + 9
    assert plan["total_bytes"] == 10 * dump_bytes(100, 576, 5, "float32")
