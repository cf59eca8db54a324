"""Convergence plots: loss terms and COCO AP of one or several training runs, on shared axes.

Reads what training writes (``detr_jax.metrics.MetricsWriter``): WORKDIR/history/train.jsonl (a row
per logged step: loss terms, class_error, lr, epoch, ...) and history/eval.jsonl (a row per
evaluation: AP, AP50, ..., the val loss terms val_loss, val_loss_ce, ..., epoch). A run still
going is fine: a half-written last line is ignored.
Output directory:
  losses.png   train loss terms per step (or epoch), one line per run; val terms (the eval
               history's VAL_PREFIX + term), where it has them, dashed with markers
  ap.png       AP, AP50, AP75, APs, APm, APl per evaluation, one line per run
  summary.md   best and final AP of each run (the table ``plot_runs`` returns)
"""
import dataclasses
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
import numpy as np  # noqa: E402

from detr_jax.errors import ConfigError, DataError

LOSS_TERMS = ("loss", "loss_ce", "loss_bbox", "loss_giou", "class_error", "cardinality_error")
AP_TERMS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
X_AXES = ("step", "epoch")
VAL_PREFIX = "val_"  # an eval row's loss term: val_loss, val_loss_ce, ... (``evaluation.val_loss_terms``)


@dataclasses.dataclass
class Run:
    """One training run's history: name (legend), train rows, eval rows (dicts, in file order)."""
    name: str
    train: list
    eval: list


def read_history(path) -> list[dict]:
    """A history jsonl -> its rows; [] when the file does not exist yet. A last line that is not
    complete json (the run is writing it) is left out; a bad line before it is an error naming it."""
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            if number == len(lines):
                break  # being written
            raise DataError(f"{path}:{number}: not a json object ({error})") from None
        if not isinstance(row, dict) or "step" not in row:
            raise DataError(f"{path}:{number}: expected a json object with a 'step' field, got {line[:80]!r}")
        rows.append(row)
    return rows


def load_runs(workdirs, labels=()) -> list[Run]:
    """The histories of ``workdirs``; legend names from ``labels``, else the folder names (the whole
    paths where folder names repeat). A workdir without any history is an error naming it."""
    if labels and len(labels) != len(workdirs):
        raise ConfigError(f"{len(labels)} labels for {len(workdirs)} workdirs; give one label per workdir")
    folders = [Path(w).name for w in workdirs]
    names = list(labels) or (folders if len(set(folders)) == len(folders) else [str(w) for w in workdirs])
    runs = []
    for workdir, name in zip(workdirs, names):
        history = Path(workdir) / "history"
        run = Run(name, read_history(history / "train.jsonl"), read_history(history / "eval.jsonl"))
        if not run.train and not run.eval:
            raise FileNotFoundError(f"{history}: no train.jsonl or eval.jsonl with rows (is {workdir} a training "
                                    "workdir, and has it logged a step yet?)")
        runs.append(run)
    return runs


def series(rows, key: str, x: str) -> tuple[np.ndarray, np.ndarray]:
    """(x values, key values) of the rows that have both, finite, in row order."""
    pairs = [(r[x], r[key]) for r in rows if x in r and key in r]
    pairs = [(a, b) for a, b in pairs if math.isfinite(a) and math.isfinite(b)]
    return np.asarray([a for a, _ in pairs], float), np.asarray([b for _, b in pairs], float)


def run_series(run: Run, term: str, x: str) -> tuple:
    """(train series, eval series) of ``term`` in a run: train rows' ``term``; eval rows'
    VAL_PREFIX + term for a loss term (LOSS_TERMS), else their ``term`` (AP terms)."""
    return series(run.train, term, x), series(run.eval, VAL_PREFIX + term if term in LOSS_TERMS else term, x)


def curves_figure(runs, terms, x: str = "step") -> plt.Figure:
    """A panel per term some run has; in each, a line per run: its train rows' term solid, its eval
    rows' VAL_PREFIX + term dashed with markers (labelled 'train' / 'val' when a run has both); AP
    terms, which only eval rows have, under their own name. One legend for all."""
    if x not in X_AXES:
        raise ValueError(f"x axis {x!r}; expected one of {', '.join(X_AXES)}")
    present = [t for t in terms if any(len(s[0]) for run in runs for s in run_series(run, t, x))]
    if not present:
        raise ConfigError(f"no run has any of {', '.join(terms)} per {x}")
    cols = min(3, len(present))
    nrows = -(-len(present) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.0 * nrows + 0.6), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, term in zip(axes.flat, present):
        for i, run in enumerate(runs):
            train, val = run_series(run, term, x)
            both = len(train[0]) and len(val[0])
            if len(train[0]):
                ax.plot(*train, "-", color=colours[i % len(colours)], label=run.name + (" (train)" if both else ""))
            if len(val[0]):
                ax.plot(*val, "o--", color=colours[i % len(colours)], markersize=4,
                        label=run.name + (" (val)" if both else ""))
        ax.set_title(term, fontsize=10)
        ax.set_xlabel(x)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(present):]:
        ax.axis("off")
    legend = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    fig.legend(legend.values(), legend.keys(), loc="upper center", ncol=min(len(legend), 4), fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / fig.get_figheight()))
    return fig


def summary_table(runs) -> str:
    """Markdown: per run, its evaluations, best AP (and its step), final AP / AP50 / AP75 (and step)."""
    lines = ["| run | evaluations | best AP | at step | final AP | final AP50 | final AP75 | at step |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for run in runs:
        evals = [r for r in run.eval if "AP" in r]
        if not evals:
            lines.append(f"| {run.name} | 0 | - | - | - | - | - | - |")
            continue
        best, final = max(evals, key=lambda r: r["AP"]), evals[-1]
        finals = " | ".join(f"{final[k]:.4f}" if k in final else "-" for k in ("AP", "AP50", "AP75"))
        lines.append(f"| {run.name} | {len(evals)} | {best['AP']:.4f} | {best['step']} | {finals} | {final['step']} |")
    return "\n".join(lines) + "\n"


def plot_runs(workdirs, out_dir, *, x: str = "step", labels=(), log=print) -> str:
    """Write the files of the module docstring for ``workdirs`` into ``out_dir``; -> the summary
    table. ap.png is left out while no run has been evaluated."""
    runs = load_runs(workdirs, labels)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, terms, history in (("losses.png", LOSS_TERMS, "train"), ("ap.png", AP_TERMS, "eval")):
        if not any(getattr(run, history) for run in runs):
            log(f"no {history} history in any run yet: {name} not written")
            continue
        fig = curves_figure(runs, terms, x)
        fig.savefig(out_dir / name, dpi=90)
        plt.close(fig)
        written.append(name)
    table = summary_table(runs)
    (out_dir / "summary.md").write_text(table)
    log(table.rstrip("\n"))
    log(f"wrote {', '.join(written + ['summary.md'])} in {out_dir}")
    return table
