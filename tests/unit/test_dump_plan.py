"""Disk planning: the MiniMax-M3 figure T*(n+1)*H*2, fp8 and final-state-free dumps, and the recipe-free planner
(`dflashkit plan --model`, and `plan-dump` kept as a pointer with the same flags) on a real config."""
import json

from dflashkit.cli import main
from dflashkit.dump.plan import PER_FILE_OVERHEAD, dump_bytes
from dflashkit.prepare import model_dir


def test_minimax_m3_sample_is_about_604_mb():
    payload = 8192 * (5 + 1) * 6144 * 2
    assert payload == 603_979_776
    got = dump_bytes(8192, 6144, 5, "bfloat16")
    assert got == payload + 8192 * 9 + PER_FILE_OVERHEAD  # + int64 ids and uint8 mask per token
    assert round(got / 1e6) == 604
    # fp8: one byte per value and a float32 scale per token and stored layer; --no-final-state: 5 layers, not 6
    assert dump_bytes(8192, 6144, 5, "float8_e4m3fn") == 8192 * (6 * (6144 + 4) + 9) + PER_FILE_OVERHEAD
    assert dump_bytes(8192, 6144, 5, "bfloat16", final_state=False) == 8192 * (5 * 6144 * 2 + 9) + PER_FILE_OVERHEAD


def test_cli_reads_the_model_config(capsys):
    for command in ("plan", "plan-dump"):
        assert main([command, "--model", str(model_dir()), "--dtype", "float32", "--mean-tokens", "100",
                     "--num-conversations", "10"]) == 0
        captured = capsys.readouterr()
        plan = json.loads(captured.out.rsplit("}", 1)[0] + "}")
        assert plan["hidden_size"] == 576 and plan["target_layer_ids"] == [1, 8, 14, 20, 27]
        assert plan["bytes_per_token"] == 6 * 576 * 4 + 9
        assert plan["total_bytes"] == 10 * dump_bytes(100, 576, 5, "float32")
        modes = plan["disk_by_mode"]
        assert modes["offline bf16"]["dump"] == 10 * dump_bytes(100, 576, 5, "bfloat16")
        assert modes["offline fp8"]["dump"] == 10 * dump_bytes(100, 576, 5, "float8_e4m3fn")
        assert modes["online"]["dump"] == 0 < modes["online"]["data"]
        assert ("plan-dump is now" in captured.err) == (command == "plan-dump")
