"""SIGTERM to a `dflashkit` command unwinds its stack, so what a context manager started (a vLLM server in eval and
demo) is stopped instead of outliving the command."""
import os
import signal
import subprocess
import sys
import textwrap

from tests.helpers.procs import wait_until


def test_sigterm_runs_cleanup_and_exits_143(tmp_path):
    (tmp_path / "slowcmd.py").write_text(textwrap.dedent(f"""
        import time
        def main(argv):
            try:
                open({str(tmp_path / "started")!r}, "w").close()
                time.sleep(60)
            finally:
                open({str(tmp_path / "cleaned")!r}, "w").close()
    """))
    code = "import sys, dflashkit.cli as c; c.COMMANDS['slow'] = ('slowcmd', ''); sys.exit(c.main(['slow']))"
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env)
    wait_until("the command to start", lambda: (tmp_path / "started").exists(), timeout=60, every=0.1, proc=proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 143
    assert (tmp_path / "cleaned").exists(), "the finally block did not run"
