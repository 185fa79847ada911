import socket
import subprocess
import sys
import time

import pytest

from dflashkit import serve


def test_vllm_command_line():
    cmd = serve.server_command("vllm", "/m", 8000, "name", tp=4, extra_args=["--block-size", "128"], python="py")
    assert cmd == ["py", "-m", "vllm.entrypoints.openai.api_server", "--model", "/m", "--served-model-name", "name",
                   "--host", "127.0.0.1", "--port", "8000", "--tensor-parallel-size", "4", "--block-size", "128"]


def test_sglang_command_line_keeps_the_key_off_argv():
    cmd = serve.server_command("sglang", "/m", 30000, "name", tp=8, extra_args=["--mem-fraction-static", "0.8"],
                               python="py")
    assert cmd == ["py", "-m", "dflashkit.serve", "sglang-launch", "--model-path", "/m", "--served-model-name", "name",
                   "--host", "127.0.0.1", "--port", "30000", "--tp-size", "8", "--mem-fraction-static", "0.8"]
    assert not any("key" in a for a in cmd)
    assert serve.api_key_env("sglang") == "DFLASHKIT_API_KEY" and serve.api_key_env("vllm") == "VLLM_API_KEY"


def test_extra_args_follow_shell_word_rules_without_evaluation():
    text = """--chat-template '/a dir/t.jinja' --x "y z" --cmd '$(touch /tmp/p)' ; `id` --json '{"a": 1}'"""
    assert serve.split_extra_args(text) == ["--chat-template", "/a dir/t.jinja", "--x", "y z", "--cmd",
                                            "$(touch /tmp/p)", ";", "`id`", "--json", '{"a": 1}']


@pytest.mark.parametrize("flag", ["--host 0.0.0.0", "--port=1", "--api-key k"])
def test_extra_args_may_not_override_managed_flags(flag):
    with pytest.raises(ValueError, match="worker.sh manages"):
        serve.split_extra_args(flag)


def test_command_subcommand_prints_nul_separated_argv():
    out = subprocess.run([sys.executable, "-m", "dflashkit.serve", "command", "--backend", "vllm", "--model", "/m",
                          "--served-model-name", "n", "--port", "1", "--extra-args", "--a 'b c'"],
                         capture_output=True, check=True).stdout
    assert out.split(b"\0")[-3:] == [b"--a", b"b c", b""]


def test_free_port_avoids_a_taken_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        assert serve.free_port(taken) != taken


def test_wait_fails_fast_when_the_process_dies(tmp_path):
    log = tmp_path / "server.log"
    log.write_text("boom: bad flag\n")
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(3)"])
    proc.wait()
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="exited before becoming healthy(.|\n)*boom: bad flag"):
        serve.wait_healthy(f"http://127.0.0.1:{serve.free_port()}", proc.pid, timeout=60, log=str(log))
    assert time.monotonic() - t0 < 5


def test_wait_times_out(tmp_path):
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="not healthy after 1s"):
        serve.wait_healthy(f"http://127.0.0.1:{serve.free_port()}", None, timeout=1, interval=0.2)
    assert time.monotonic() - t0 < 5
