#!/usr/bin/env python3
"""Prove the README's two commands: clone the repository into a temporary folder and run them there.

  python3 .ci/fresh_clone_check.py               # both commands verbatim: install, the CPU demo, the test suite
  python3 .ci/fresh_clone_check.py --tests_only  # the second only: the whole test suite (about 23 minutes)
  python3 .ci/fresh_clone_check.py --quick       # CI's reduced form (about a minute): see below
  python3 .ci/fresh_clone_check.py --demo_only --demo_args="--config.data.synthetic_seed=1"
                                                 # the first only, with arguments added (another split)

The commands are the two lines of the README's "Start here" block (between the ``start-here``
markers). The clone is of the committed HEAD of this repository, so uncommitted changes are not
checked. It goes into a new temporary folder with nothing beside it (no ``../shared``), so the tests
can only use what is committed (their official-model fixtures are in tests/data). Any command
failing fails the check; each one's wall time is printed, and the AP the demo printed.

--quick keeps the commands but makes them cheap: the clone's .venv sees this interpreter's
installed packages (a .pth file), so ``pip install -r requirements.txt`` runs and finds every pin
satisfied without downloading; the demo gets ``--config=configs/synthetic.py:tiny`` (a few steps of
a tiny model, evaluated at the end); the test command gets ``-k`` of two small test files, one of
which reads the official-model fixtures.
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"<!-- start-here -->\s*```bash\n(.*?)```\s*<!-- /start-here -->", re.S)
QUICK_DEMO = " --config=configs/synthetic.py:tiny --config.train.eval_at_end=True --workdir=runs/quick"
QUICK_TESTS = ' -k "test_box_ops or test_param_count"'


def readme_commands(readme: str) -> list[str]:
    """The two command lines of the README's start-here block."""
    found = MARKER.search(readme)
    if not found:
        raise SystemExit("README.md: no <!-- start-here --> ```bash ... ``` <!-- /start-here --> block")
    commands = [line.strip() for line in found.group(1).splitlines() if line.strip() and not line.startswith("#")]
    if len(commands) != 2:
        raise SystemExit(f"README.md: the start-here block must hold 2 command lines; found {len(commands)}: {commands}")
    return commands


def share_installed_packages(clone: Path) -> None:
    """Make clone/.venv see this interpreter's site-packages, so the README's pip install is a no-op."""
    subprocess.run([sys.executable, "-m", "venv", str(clone / ".venv")], check=True)
    site = next((clone / ".venv" / "lib").glob("python3*/site-packages"))
    (site / "_fresh_clone_check.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")


def run(command: str, cwd: Path, log) -> str:
    """Run one README command line in bash; its output goes to ``log`` as it comes -> the output."""
    log(f"$ {command}")
    started, lines = time.time(), []
    with subprocess.Popen(["bash", "-c", command], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True) as process:
        for line in process.stdout:
            lines.append(line)
            log(line.rstrip("\n"))
    log(f"-> exit {process.returncode} after {time.time() - started:.0f} s")
    if process.returncode:
        raise SystemExit(f"fresh-clone check failed: {command!r} exited with {process.returncode}")
    return "".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI's reduced form (see the module docstring)")
    parser.add_argument("--tests_only", action="store_true", help="run only the second command (the test suite)")
    parser.add_argument("--demo_only", action="store_true", help="run only the first command (the demo)")
    parser.add_argument("--demo_args", default="", help="arguments added to the demo's command line")
    parser.add_argument("--keep", action="store_true", help="keep the temporary clone (its path is printed)")
    args = parser.parse_args(argv)
    demo, tests = readme_commands((REPO / "README.md").read_text())
    if args.tests_only and args.demo_only:
        parser.error("--tests_only and --demo_only leave nothing to run")
    if args.quick:
        demo, tests = demo + QUICK_DEMO, tests + QUICK_TESTS
    if args.demo_args:
        demo = f"{demo} {args.demo_args}"
    commands = [] if args.demo_only else [("second command (tests)", tests)]
    if not args.tests_only:
        commands.insert(0, ("first command (demo)", demo))
    tmp = tempfile.mkdtemp(prefix="detr-jax-fresh-")
    clone = Path(tmp) / "detr-jax"
    try:
        subprocess.run(["git", "clone", "--quiet", str(REPO), str(clone)], check=True)
        beside = [p.name for p in Path(tmp).iterdir() if p != clone]
        if beside:  # e.g. a ../shared the tests could read
            raise SystemExit(f"fresh-clone check: {tmp} holds {beside} beside the clone")
        if args.quick:
            share_installed_packages(clone)
        log = lambda line: print(line, flush=True)
        times = {}
        for name, command in commands:
            started = time.time()
            output = run(command, clone, log)
            times[name] = time.time() - started
            if name.startswith("first"):
                ap = re.search(r"COCO AP ([0-9.]+)", output)
                times["AP printed"] = ap.group(1) if ap else "none"
                demo_seconds = re.search(r"demo finished in ([0-9]+) s", output)
                times["demo's own time"] = f"{demo_seconds.group(1)} s" if demo_seconds else "none"
        print("fresh-clone check passed: " + "; ".join(f"{k}: {v:.0f} s" if isinstance(v, float) else f"{k}: {v}"
                                                        for k, v in times.items()))
    finally:
        if args.keep:
            print(f"clone kept in {clone}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1:])
