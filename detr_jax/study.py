r"""Convergence studies: a declared grid of training runs (groups x seeds), run one after another on
this machine or printed as commands, and a report of how fast each group converges.

  python -m detr_jax.study --config=configs/study_cpu.py --workdir=runs/study-cpu
  python -m detr_jax.study --config=configs/study_cpu.py --workdir=runs/study-cpu --print_commands
  python -m detr_jax.study --config=configs/study_cpu.py --workdir=runs/study-cpu --report_only

The study config (``get_config()`` of a file, an ml_collections ConfigDict) has the fields
  groups     a list of dicts {"name": a folder name, unique; "config": "FILE.py[:VARIANT]" as train.py's
             --config, relative to the repository; "overrides": {"section.field": value} (optional)}
  seeds      a tuple of ints (default (0,)): every group runs once per seed (config.train.seed)
  fractions  a tuple of numbers in (0, 1] (default (0.5, 0.75, 0.9)): the report gives, for each, the
             first epoch at which a run's AP >= fraction x its best AP
  overrides  (optional) shared by every group, applied before the group's own: nested
             ({"train": {"num_steps": 400}}, which --config.overrides.train.num_steps=200 can change)
             or with dotted keys, as the groups' overrides may be too.
Every group's config is loaded, overridden and validated as train.py would before any run starts.

Run (group, seed), in the order seed by seed, group by group, is ``python train.py --config=CONFIG
--workdir=WORKDIR/runs/GROUP/seed_S --config.train.seed=S --config.KEY=VALUE ...`` from the
repository root; its output goes to RUN/train.log, a line as each run starts (with an ETA from the
runs finished) and ends to the console. RUN/study_run.json records the command and every attempt
(start time, seconds, exit status), and "finished": true once train.py exited 0 at its planned end
(its log has no "stopped by" line: a signal stops train.py with exit status 0 too). A finished run
is skipped; any other is started again in its workdir, where train.py resumes from its
checkpoints. An attempt whose end the study did not see (the study was killed) counts until its
log's last write. A run that fails, or a signal to the study (passed on to train.py as SIGTERM: it
saves its checkpoint), stops the study, naming the command, the log (its last lines shown) and the
runs not finished.

Report (at the end, or alone with --report_only from whatever exists, runs still going included):
  study.md        a row per run: status, evaluations, final AP, best AP and its epoch, for each
                  fraction the first epoch reaching it, wall time; a row per group: mean ± spread
                  over its seeds (spread: half of max - min, the band of the plots); the plots;
                  printed too
  plots/ap.png    COCO AP per epoch (history/eval.jsonl), a line per group: the mean over its seeds
                  at every step a seed has, in the band of their min..max
  plots/loss.png  the training loss per epoch (history/train.jsonl), the same way
"""
import dataclasses
import importlib.util
import json
import math
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import matplotlib
import ml_collections
import numpy as np
from absl import flags
from ml_collections import config_flags

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

from detr_jax import cli  # noqa: E402
from detr_jax.errors import ConfigError, UsageError  # noqa: E402
from detr_jax.metrics import format_duration  # noqa: E402
from detr_jax.visualize.plots import read_history  # noqa: E402

REPO = Path(__file__).resolve().parents[1]  # train.py runs here: configs/ paths resolve from it
MARKER, LOG = "study_run.json", "train.log"
DEFAULTS = dict(seeds=(0,), fractions=(0.5, 0.75, 0.9), overrides={})
GROUP_FIELDS = ("name", "config", "overrides")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")


@dataclasses.dataclass(frozen=True)
class Run:
    """One (group, seed) of a study: its workdir and train.py's arguments (run from REPO)."""
    group: str
    seed: int
    workdir: Path
    args: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"{self.group} seed {self.seed}"

    @property
    def command(self) -> list[str]:
        return [sys.executable, *self.args]


@dataclasses.dataclass(frozen=True)
class Study:
    """The runs of a study, seed-major, and the fractions of the best AP its report gives."""
    runs: tuple[Run, ...]
    fractions: tuple[float, ...]


@dataclasses.dataclass(frozen=True)
class Result:
    """What a run has so far: status ("finished", "unfinished": attempted, "no record": a history but
    no study_run.json, "not started"), wall seconds over its attempts (None: never run by the
    study), its eval and train history rows (one per step, the latest where a resumed run logged a
    step again)."""
    run: Run
    status: str
    wall: float | None
    eval: list[dict]
    train: list[dict]


def flat_overrides(overrides: dict, prefix: str = "") -> dict:
    """{"train": {"num_steps": 4}, "model.pre_norm": True} -> {"train.num_steps": 4, "model.pre_norm":
    True}: nested dicts flattened to dotted keys."""
    flat = {}
    for key, value in overrides.items():
        if isinstance(value, dict):
            flat.update(flat_overrides(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def load_config(spec: str) -> ml_collections.ConfigDict:
    """The config of a train.py --config spec "FILE.py[:VARIANT]" (FILE relative to REPO, or absolute),
    as ml_collections loads it: ``get_config(VARIANT)``, or ``get_config()`` without a colon."""
    path, colon, variant = spec.partition(":")
    file = REPO / path
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no such config file")
    module_spec = importlib.util.spec_from_file_location(f"study_target_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(variant) if colon else module.get_config()


def set_field(config: ml_collections.ConfigDict, key: str, value) -> None:
    """config.KEY = value for a dotted KEY; KeyError when the config has no such field, TypeError
    (ml_collections') when the value cannot take the field's type."""
    *sections, field = key.split(".")
    node = config
    for section in sections:
        node = node.get(section) if isinstance(node, ml_collections.ConfigDict) else None
    if not isinstance(node, ml_collections.ConfigDict) or field not in node:
        raise KeyError(key)
    node[field] = value


def flag_value(value) -> str:
    """An override's value as --config.KEY=VALUE writes it: a string as it is, else its repr."""
    return value if isinstance(value, str) else repr(value)


def target_problem(spec: str, overrides: dict) -> tuple[str, str] | None:
    """What is wrong with train.py's config ``spec`` under ``overrides`` ({dotted key: value}): its
    file or variant, an override key it lacks or a value of the wrong type, or what the validator
    finds -> (the study field suffix: "config", "overrides" or "", the message); None if nothing."""
    try:
        config = load_config(spec)
    except (FileNotFoundError, ValueError, ImportError, AttributeError) as error:
        return "config", f"{spec!r}: {error}"
    for key, value in overrides.items():
        try:
            set_field(config, key, value)
        except KeyError:
            return "overrides", f"{key!r}: {spec} has no field {key!r}"
        except TypeError as error:
            return "overrides", f"{key!r}: {error}"
    from detr_jax.validation import validate  # imports the data pipeline (tensorflow): only here

    try:
        validate(config)
    except ConfigError as error:
        return "", f"{spec} with its overrides: {error}"
    return None


def checked(study: ml_collections.ConfigDict, file: str) -> tuple[list, tuple, tuple]:
    """The study config's fields, checked -> (groups [(name, config spec, {dotted key: value}: the
    shared overrides, then the group's)], seeds, fractions). ConfigError naming ``file`` and the field."""
    def problem(field, message):
        return ConfigError(f"{file}: {field}: {message}")

    fields = {**DEFAULTS, **study.to_dict()}  # plain dicts and lists from here
    unknown = sorted(set(fields) - {"groups", *DEFAULTS})
    if unknown:
        raise problem(unknown[0], f"unknown field; expected groups, {', '.join(DEFAULTS)}")
    groups, seeds, fractions = fields.get("groups"), fields["seeds"], fields["fractions"]
    if not isinstance(groups, (list, tuple)) or not groups:
        raise problem("groups", "expected a non-empty list of dicts with name, config and overrides")
    if (not isinstance(seeds, (list, tuple)) or not seeds or len(set(seeds)) != len(seeds)
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)):
        raise problem("seeds", f"{seeds!r}: expected a non-empty tuple of distinct integers >= 0")
    if not isinstance(fractions, (list, tuple)) or not fractions or not all(
            isinstance(f, (int, float)) and not isinstance(f, bool) and 0 < f <= 1 for f in fractions):
        raise problem("fractions", f"{fractions!r}: expected a non-empty tuple of numbers in (0, 1]")
    shared = flat_overrides(fields["overrides"])
    result = []
    for i, group in enumerate(groups):
        where = f"groups[{i}]"
        if not isinstance(group, dict) or set(group) - set(GROUP_FIELDS) or not {"name", "config"} <= set(group):
            raise problem(where, f"{group!r}: expected a dict with name, config and optionally overrides")
        name, spec = group["name"], group["config"]
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise problem(f"{where}.name", f"{name!r}: expected a folder name (letters, digits, _ . + -)")
        if name in [g[0] for g in result]:
            raise problem(f"{where}.name", f"{name!r} is the name of an earlier group too")
        if not isinstance(spec, str):
            raise problem(f"{where}.config", f"{spec!r}: expected 'FILE.py[:VARIANT]'")
        overrides = {**shared, **flat_overrides(group.get("overrides", {}))}
        if "train.seed" in overrides:
            raise problem(f"{where}.overrides", "'train.seed' is set by the study's seeds")
        found = target_problem(spec, overrides)
        if found:
            raise problem(f"{where}.{found[0]}".rstrip("."), found[1])
        result.append((name, spec, overrides))
    return result, tuple(seeds), tuple(float(f) for f in fractions)


def load_study(study: ml_collections.ConfigDict, file: str, workdir) -> Study:
    """The checked study config ``study`` (from ``file``) as runs in ``workdir``/runs/GROUP/seed_S."""
    groups, seeds, fractions = checked(study, file)
    runs = []
    for seed in seeds:
        for name, spec, overrides in groups:
            run_dir = Path(workdir).resolve() / "runs" / name / f"seed_{seed}"
            args = ("train.py", f"--config={spec}", f"--workdir={run_dir}", f"--config.train.seed={seed}",
                    *(f"--config.{key}={flag_value(value)}" for key, value in overrides.items()))
            runs.append(Run(name, seed, run_dir, args))
    return Study(tuple(runs), fractions)


def read_marker(run: Run) -> dict:
    """RUN/study_run.json: {"command": [...], "attempts": [{"started": unix time, "seconds": float or
    None (not seen ending), "returncode": int or None}], "finished": bool}; {} when absent."""
    path = run.workdir / MARKER
    return json.loads(path.read_text()) if path.exists() else {}


def write_marker(run: Run, marker: dict) -> None:
    path = run.workdir / MARKER
    path.with_suffix(".tmp").write_text(json.dumps(marker, indent=1) + "\n")
    path.with_suffix(".tmp").replace(path)  # whole or not at all


def attempt_seconds(attempt: dict, log: Path) -> float:
    """An attempt's seconds; for one whose end was not seen, until the last write of its log."""
    if attempt["seconds"] is not None:
        return attempt["seconds"]
    return max(0.0, log.stat().st_mtime - attempt["started"]) if log.exists() else 0.0


def wall_seconds(marker: dict, log: Path) -> float | None:
    """A run's seconds over all its attempts (None: no attempt recorded)."""
    attempts = marker.get("attempts", [])
    return sum(attempt_seconds(a, log) for a in attempts) if attempts else None


class PassSignals:
    """While train.py runs: SIGINT (Ctrl-C) and SIGTERM to the study are passed on to it as SIGTERM
    (train.py saves its checkpoint and exits; a Ctrl-C from the terminal reaches it too, a second
    one ends it at once) and remembered in ``received``."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, process: subprocess.Popen):
        self.process, self.received = process, None

    def _handle(self, signum, frame):
        self.received = self.received or signal.Signals(signum).name
        self.process.send_signal(signal.SIGTERM)

    def __enter__(self):
        self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, previous in self._previous.items():
            signal.signal(s, previous)


def attempt(run: Run) -> tuple[dict, str | None]:
    """One more attempt of ``run``: train.py to the end of RUN/train.log, the attempt recorded in
    RUN/study_run.json before it starts and when it ends -> (the marker, the signal the study got
    meanwhile or None)."""
    run.workdir.mkdir(parents=True, exist_ok=True)
    log = run.workdir / LOG
    attempts = [dict(a, seconds=attempt_seconds(a, log)) for a in read_marker(run).get("attempts", [])]
    this = {"started": time.time(), "seconds": None, "returncode": None}
    marker = {"command": run.command, "attempts": attempts + [this], "finished": False}
    write_marker(run, marker)
    start = log.stat().st_size if log.exists() else 0
    with open(log, "a") as out:
        out.write(f"=== study attempt {len(marker['attempts'])}, {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                  f"{shlex.join(run.command)}\n")
        out.flush()
        process = subprocess.Popen(run.command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
        with PassSignals(process) as signals:
            returncode = process.wait()
    with open(log, "rb") as text:
        text.seek(start)
        stopped = any(line.startswith(b"stopped by ") for line in text)  # train.py's line when a signal stopped it
    this.update(seconds=time.time() - this["started"], returncode=returncode)
    marker["finished"] = returncode == 0 and not stopped
    write_marker(run, marker)
    return marker, signals.received


def eta(runs) -> str:
    """The time the runs not finished should take, from the mean wall time of those finished."""
    markers = [read_marker(run) for run in runs]
    done = [wall_seconds(m, r.workdir / LOG) for r, m in zip(runs, markers) if m.get("finished")]
    left = sum(1 for m in markers if not m.get("finished"))
    if not done:
        return "ETA after the first run"
    return f"ETA {format_duration(left * sum(done) / len(done))} for {left} run(s) (mean of {len(done)} done)"


def stopped_error(run: Run, marker: dict, received: str | None, left) -> UsageError:
    """The error that stops the study after ``run``'s attempt did not finish it (or a signal came)."""
    returncode = marker["attempts"][-1]["returncode"]
    what = (f"interrupted by {received} during {run.name} (its exit status {returncode})" if received else
            f"{run.name} failed (exit status {returncode})" if returncode else
            f"{run.name} was stopped by a signal before its end (its checkpoint saved)")
    not_done = ", ".join(r.name for r in left if not read_marker(r).get("finished")) or "none"
    return UsageError(f"{what}; command: cd {REPO} && {shlex.join(run.command)}; log: {run.workdir / LOG}; "
                      f"not finished: {not_done}; the same study command resumes the study (finished runs are skipped)")


def run_study(study: Study, log=lambda line: print(line, flush=True)) -> None:
    """Every run of ``study`` not finished yet, one after another (see the module docstring);
    UsageError (with the end of its log on ``log``) at the first run that does not finish."""
    runs = study.runs
    for index, run in enumerate(runs, start=1):
        label, run_log, marker = f"run {index}/{len(runs)} {run.name}", run.workdir / LOG, read_marker(run)
        if marker.get("finished"):
            log(f"study: {label}: finished before ({format_duration(wall_seconds(marker, run_log))}), skipped")
            continue
        start = f"attempt {len(marker['attempts']) + 1}, resuming" if marker else "starting"
        log(f"study: {label}: {start} (log {run_log}); {eta(runs)}")
        marker, received = attempt(run)
        if marker["finished"] and not received:
            log(f"study: {label}: finished in {format_duration(wall_seconds(marker, run_log))}")
            continue
        log(f"study: the end of {run_log}:\n" + "".join(run_log.read_text(errors="replace").splitlines(True)[-10:]))
        raise stopped_error(run, marker, received, runs[index - 1:])


def by_step(rows: list[dict]) -> list[dict]:
    """History rows, one per step (the last written: a resumed run logs some steps again), by step."""
    latest = {row["step"]: row for row in rows}
    return [latest[step] for step in sorted(latest)]


def result_of(run: Run) -> Result:
    """What ``run`` has on disk now."""
    marker, history = read_marker(run), run.workdir / "history"
    evals, train = (by_step(read_history(history / f"{name}.jsonl")) for name in ("eval", "train"))
    status = ("finished" if marker.get("finished") else "unfinished" if marker else
              "no record" if evals or train else "not started")  # no record: run by a printed command
    return Result(run, status, wall_seconds(marker, run.workdir / LOG), evals, train)


def convergence(rows: list[dict], fractions) -> dict:
    """A run's eval rows (dicts with epoch and AP, by step) -> {"evaluations": N, "final_ap", "best_ap",
    "best_epoch" (the first epoch with the best AP), "reached": (for each fraction f, the first epoch
    at which AP >= f * best_ap)}; {} without such a row."""
    rows = [r for r in rows if math.isfinite(r.get("AP", math.nan)) and "epoch" in r]
    if not rows:
        return {}
    best = max(rows, key=lambda r: r["AP"])  # the first of equal maxima
    reached = tuple(next(r["epoch"] for r in rows if r["AP"] >= f * best["AP"]) for f in fractions)
    return {"evaluations": len(rows), "final_ap": rows[-1]["AP"], "best_ap": best["AP"], "best_epoch": best["epoch"],
            "reached": reached}


def mean_spread(values, form: str = ".4f", unit: str = "") -> str:
    """'mean ± spread' of the values that are not None (spread: half of max - min); '-' if none."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    return f"{np.mean(values):{form}} ± {(max(values) - min(values)) / 2:{form}}{unit}"


def epoch_text(epoch) -> str:
    return "-" if epoch is None else f"{round(epoch, 2):g}"


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines) + "\n"


def run_row(result: Result, stats: dict, fractions) -> list[str]:
    """A run's cells: group, seed, status, evaluations, final AP, best AP, its epoch, the epoch
    reaching each fraction, wall time."""
    aps = [f"{stats[k]:.4f}" if stats else "-" for k in ("final_ap", "best_ap")]
    reached = stats.get("reached", [None] * len(fractions))
    return [result.run.group, str(result.run.seed), result.status, str(stats.get("evaluations", 0)), *aps,
            epoch_text(stats.get("best_epoch")), *map(epoch_text, reached),
            "-" if result.wall is None else format_duration(result.wall)]


def group_row(group: str, results: list[Result], stats: list[dict], fractions) -> list[str]:
    """A group's cells (its runs' ``results`` and ``stats``): runs evaluated, then mean ± spread of
    final AP, best AP, the epoch reaching each fraction, and the wall time of its finished runs."""
    evaluated = [s for s in stats if s]
    return [group, f"{len(evaluated)}/{len(stats)}",
            *(mean_spread([s[k] for s in evaluated]) for k in ("final_ap", "best_ap")),
            *(mean_spread([s["reached"][i] for s in evaluated], ".2f") for i in range(len(fractions))),
            mean_spread([r.wall for r in results if r.status == "finished"], ".0f", " s")]


def tables(results: list[Result], fractions) -> str:
    """study.md's tables: a row per run (by group, then seed), then a row per group."""
    reach = [f"epoch AP >= {f:g} best" for f in fractions]
    groups = list(dict.fromkeys(r.run.group for r in results))
    results = sorted(results, key=lambda r: (groups.index(r.run.group), r.run.seed))
    stats = [convergence(r.eval, fractions) for r in results]
    mine = {g: [i for i, r in enumerate(results) if r.run.group == g] for g in groups}
    return ("## Runs\n\n" +
            markdown(["group", "seed", "status", "evaluations", "final AP", "best AP", "best at epoch", *reach, "wall"],
                     [run_row(r, s, fractions) for r, s in zip(results, stats)]) +
            "\n## Groups: mean ± spread over the seeds (spread: half of max - min)\n\n" +
            markdown(["group", "seeds evaluated", "final AP", "best AP", *reach, "wall (finished runs)"],
                     [group_row(g, [results[i] for i in mine[g]], [stats[i] for i in mine[g]], fractions)
                      for g in groups]))


def curve(rows: list[dict], key: str) -> dict:
    """{step: (epoch, value)} of the rows with a finite ``key`` and an epoch."""
    return {r["step"]: (r["epoch"], r[key]) for r in rows if "epoch" in r and math.isfinite(r.get(key, math.nan))}


def band(curves: list[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Curves {step: (epoch, value)} -> (epoch, mean, min, max) [N] each, at every step any curve has
    (over the curves that have it), by step."""
    steps = sorted(set().union(*curves))
    points = [[c[s] for c in curves if s in c] for s in steps]
    epochs = [p[0][0] for p in points]
    values = [[v for _, v in p] for p in points]
    return (np.asarray(epochs, float), np.asarray([np.mean(v) for v in values]),
            np.asarray([min(v) for v in values]), np.asarray([max(v) for v in values]))


def plot_groups(results: list[Result], history: str, key: str, path: Path) -> bool:
    """A line per group: the mean of ``key`` over its runs' ``history`` ("eval" or "train") rows per
    epoch, in their min..max band; -> False (nothing written) when no run has any."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    drawn = False
    for group in dict.fromkeys(r.run.group for r in results):
        curves = [c for c in (curve(getattr(r, history), key) for r in results if r.run.group == group) if c]
        if not curves:
            continue
        epochs, mean, low, high = band(curves)
        line, = ax.plot(epochs, mean, "-", marker="o" if history == "eval" else None, markersize=3,
                        label=f"{group} ({len(curves)} run{'s' * (len(curves) > 1)})")
        ax.fill_between(epochs, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
        drawn = True
    if drawn:
        ax.set(xlabel="epoch", ylabel=key, title=f"{key} ({history}): mean over seeds, min..max shaded")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=9)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=90)
    plt.close(fig)
    return drawn


def write_report(study: Study, workdir, log=print) -> str:
    """WORKDIR/study.md and plots/{ap,loss}.png from what the runs have now -> study.md's text."""
    workdir = Path(workdir)
    results = [result_of(run) for run in study.runs]
    text = tables(results, study.fractions)
    for history, key, name in (("eval", "AP", "ap.png"), ("train", "loss", "loss.png")):
        if plot_groups(results, history, key, workdir / "plots" / name):
            text += f"\n![{key}](plots/{name})\n"
        else:
            log(f"study: no run has {history} history with {key} yet: plots/{name} not written")
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "study.md").write_text(text)
    return text


def define_flags() -> None:
    config_flags.DEFINE_config_file("config", None, "Study config file, e.g. configs/study_cpu.py (its fields: "
                                    "detr_jax/study.py's docstring).")
    flags.DEFINE_string("workdir", None, "Study folder: runs/GROUP/seed_S, study.md, plots/.", required=True)
    flags.DEFINE_bool("print_commands", False, "Print each run's command, a line each (for a cluster), and exit.")
    flags.DEFINE_bool("report_only", False, "Only write study.md and plots/ from what the runs have now.")
    flags.mark_flag_as_required("config")
    flags.mark_bool_flags_as_mutual_exclusive(["print_commands", "report_only"])


def main(argv):
    del argv
    f = flags.FLAGS
    study = load_study(f.config, config_flags.get_config_filename(f["config"]), f.workdir)
    if f.print_commands:
        for run in study.runs:
            print(f"cd {shlex.quote(str(REPO))} && {shlex.join(run.command)}")
        return
    if not f.report_only:
        run_study(study)
    print(write_report(study, Path(f.workdir).resolve()), end="")


if __name__ == "__main__":  # flags defined here only: the library imports without them
    define_flags()
    cli.run(main)
