"""The README's two commands, run by .ci/fresh_clone_check.py in a fresh clone (its reduced form)."""
import os
import re
import subprocess
import sys

from conftest import REPO


def test_fresh_clone_check_quick(tmp_path):
    env = {**os.environ, "TMPDIR": str(tmp_path)}  # the clone goes under tmp_path
    result = subprocess.run([sys.executable, ".ci/fresh_clone_check.py", "--quick"], cwd=REPO, capture_output=True,
                            text=True, timeout=900, env=env)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-5000:]
    assert "demo finished in" in out and "run folder:" in out  # the first command trained, evaluated, drew
    assert re.search(r"^\d+ passed", out, re.M), out[-3000:]  # pytest's summary line of the second command
    assert "fresh-clone check passed" in out
