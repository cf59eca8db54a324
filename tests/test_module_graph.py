"""The package's import graph: no circle and no edge from a lower layer to a higher one.

Every ``import`` and ``from ... import`` of every module counts, those inside functions included:
with no circle among them, no module can fail to import because another was imported first.
"""
import ast
import subprocess
import sys
from pathlib import Path

from conftest import REPO

# lowest first; a module may import its own layer's modules and the layers below
LAYERS = [
    ["errors", "config", "classification", "cli", "box_ops", "metrics", "parallel", "perf", "torch_pickle",
     "workdir_lock"],
    ["models", "models.*", "detr_jax"],  # the package itself re-exports the model
    ["data", "data.*"],
    ["matching", "denoising", "losses", "optim"],
    ["validation"],
    ["checkpoint", "convert"],
    ["evaluation", "evaluation.*"],
    ["periodic", "pretrain", "training"],
    ["visualize", "visualize.*"],
    ["demo", "detect", "plot_runs", "study"],
]


def module_names() -> dict[str, Path]:
    """'detr_jax.x.y' -> its file, for every module of the package."""
    names = {}
    for path in (REPO / "detr_jax").rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def imports(name: str, path: Path, known) -> set[str]:
    """The package's modules that module ``name`` imports, anywhere in its body."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        found.update(t for t in targets if t in known and t != name)
    return found


def layer_of(name: str) -> int:
    short = name.removeprefix("detr_jax.") if name != "detr_jax" else "detr_jax"
    for level, members in enumerate(LAYERS):
        for member in members:
            if short == member or (member.endswith(".*") and short.startswith(member[:-1])):
                return level
    raise AssertionError(f"{name} is in no layer of tests/test_module_graph.py's LAYERS: add it")


def graph() -> dict[str, set[str]]:
    known = module_names()
    return {name: imports(name, path, known) for name, path in known.items()}


def test_no_upward_import():
    upward = [f"{a} (layer {layer_of(a)}) -> {b} (layer {layer_of(b)})"
              for a, targets in graph().items() for b in targets if layer_of(b) > layer_of(a)]
    assert not upward, upward


def test_no_circle():
    edges, state, circles = graph(), {}, []

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                circles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not circles, circles


def test_the_graph_sees_lazy_imports():
    """A circle made of an import inside a function is found (as data/source.py's used to be)."""
    edges = graph()
    assert "detr_jax.models.attention_maps" in edges["detr_jax.evaluation.inference"]  # imported in a method
    assert "detr_jax.data.coco_json" in edges["detr_jax.data.registry"]


def test_every_library_module_imports():
    """In one fresh interpreter (the entry points define flags at import: their --help tests run them)."""
    names = sorted(n for n in module_names() if layer_of(n) < len(LAYERS) - 1)
    code = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\n"
    result = subprocess.run([sys.executable, "-c", code, *names], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
