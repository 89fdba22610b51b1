"""The benchmark scripts end as ``engram`` does: one line, no traceback, status 130 or 2."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _start(tmp_path: Path, body: str) -> subprocess.Popen:
    script = tmp_path / "fake_bench.py"
    script.write_text("import sys, time\nimport entry\n"
                      "from engramlab.errors import RequestError\n\n"
                      f"def main():\n{body}\n\n"
                      "if __name__ == '__main__':\n    entry.run(main)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(BENCH), os.environ.get(
        "PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, str(script)], stderr=subprocess.PIPE, text=True,
                            env=env)


def test_ctrl_c_ends_a_bench_with_one_line_and_status_130(tmp_path):
    flag = tmp_path / "started"
    proc = _start(tmp_path, f"    open({str(flag)!r}, 'w').close()\n    time.sleep(60)")
    for _ in range(300):  # until main runs, not while Python is still starting
        if flag.exists():
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "interrupted" in err


def test_bad_input_ends_a_bench_with_one_line_and_status_2(tmp_path):
    proc = _start(tmp_path, "    raise RequestError('--n must be positive')")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert err.strip() == "fake_bench.py: error: --n must be positive"


def test_a_bench_returns_its_mains_status(tmp_path):
    proc = _start(tmp_path, "    return 3")
    proc.communicate(timeout=60)
    assert proc.returncode == 3
