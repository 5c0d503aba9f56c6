"""The package's layering (no import cycle; the model never imports what is built on it), old
module paths and names still import (with a DeprecationWarning naming the new home), and the
public API is what opt_jax re-exports."""

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import opt_jax


@pytest.mark.parametrize(
    "old, new, name",
    [
        ("opt_jax.decoding", "opt_jax.generation", "generate"),
        ("opt_jax.train", "opt_jax.training.train", "train_and_evaluate"),
        ("opt_jax.convert", "opt_jax.checkpoints.hf", "load_pretrained"),
        ("opt_jax.sharding", "opt_jax.parallel.sharding", "make_mesh"),
        ("opt_jax.parallel.memory", "opt_jax.planning.memory", "plan"),
        ("opt_jax.parallel.roofline", "opt_jax.planning.roofline", "model_flops_per_token"),
        ("opt_jax.training.tasks", "opt_jax.training.objectives", "build"),
    ],
)
def test_old_module_paths_warn_and_resolve(old, new, name):
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=f"{old} moved to {new}"):
        module = importlib.import_module(old)
    assert module is importlib.import_module(new) and hasattr(module, name)


def test_public_api():
    for name in opt_jax.__all__:
        assert hasattr(opt_jax, name), name
    assert {"generate", "GenerationConfig", "quantize", "load_pretrained"} <= set(opt_jax.__all__)


@pytest.mark.parametrize(
    "module, name, new",
    [
        ("opt_jax.checkpoints.hf", "stack_layers", "opt_jax.param_tree.stack_layers"),
        ("opt_jax.checkpoints.hf", "unstack_layers", "opt_jax.param_tree.unstack_layers"),
        ("opt_jax.lora", "save_adapter", "opt_jax.checkpoints.peft.save_adapter"),
        ("opt_jax.lora", "load_adapter", "opt_jax.checkpoints.peft.load_adapter"),
        ("opt_jax.training.step", "merge", "opt_jax.param_tree.unpartition"),
    ],
)
def test_moved_names_warn_and_resolve(module, name, new):
    new_module, _, new_name = new.rpartition(".")
    with pytest.warns(DeprecationWarning, match=f"{module}.{name} moved to {new}"):
        value = getattr(importlib.import_module(module), name)
    assert value is getattr(importlib.import_module(new_module), new_name)
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        importlib.import_module(module).no_such_name  # noqa: B018


PACKAGE = Path(opt_jax.__file__).parent
# The model and what it is made of: none of them may import the layers built on top of them.
CORE = ("config", "param_tree", "kv_cache", "layers", "model", "ops", "generation", "losses")
ABOVE_CORE = ("checkpoints", "training", "serving", "evaluation", "planning", "lora")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    """opt_jax module -> the opt_jax modules it imports, counting imports inside functions."""
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                targets |= {f"{base}.{a.name}" if f"{base}.{a.name}" in files else base
                            for a in node.names}  # fmt: skip
        graph[name] = {t for t in targets if t in files and t != name}
    return graph


def test_no_import_cycle_among_opt_jax_modules():
    graph = _import_graph()
    state = {}  # name -> "open" while on the DFS stack, "done" after

    def visit(name, trail):
        state[name] = "open"
        for target in sorted(graph[name]):
            if state.get(target) == "open":
                cycle = trail[trail.index(target) :] + [target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, trail + [target])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_the_model_imports_nothing_built_on_it():
    graph = _import_graph()
    core = [m for m in graph if m.split(".")[1:2] and m.split(".")[1] in CORE]
    assert "opt_jax.model" in core and "opt_jax.generation.api" in core
    bad = sorted(
        f"{m} -> {t}"
        for m in core
        for t in graph[m]
        if t.split(".")[1:2] and t.split(".")[1] in ABOVE_CORE
    )
    assert not bad, bad


def test_importing_the_package_warns_about_nothing():
    # A fresh interpreter: in this one the modules are imported already.
    modules = "opt_jax, opt_jax.training.train, opt_jax.serving.server, opt_jax.planning.memory"
    subprocess.run(
        [sys.executable, "-W", "error::DeprecationWarning", "-c", f"import {modules}"],
        check=True,
        timeout=120,
    )


def _reading_order():
    """(files, stated line count) of each row of the README's reading-order table."""
    root = Path(__file__).resolve().parents[1]
    text = (root / "README.md").read_text().split("## Reading order", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 4 or not cells[0].isdigit():
            continue
        files = set()
        for spec in cells[1].replace("`", "").split(", "):  # (braces hold commas, no spaces)
            spec = spec.strip()
            if "{" in spec:  # opt_jax/{a,b}.py
                head, rest = spec.split("{", 1)
                names, tail = rest.split("}", 1)
                parts = [head + n + tail for n in names.split(",")]
            else:
                parts = [spec]
            for part in parts:
                path = root / part
                assert path.exists(), f"README reading order names {part}, which does not exist"
                files |= set(path.rglob("*.py")) if path.is_dir() else {path}
        rows.append((files, int(cells[2].replace(",", ""))))
    return root, rows


def test_readme_reading_order_is_the_import_order():
    """ "Each module imports only from the rows above it" (or its own row), as the README says."""
    root, rows = _reading_order()
    row_of = {_module_name(p): i for i, (files, _) in enumerate(rows) for p in files}
    upward = sorted(
        f"{m} (row {row_of[m] + 1}) -> {t} (row {row_of[t] + 1})"
        for m, targets in _import_graph().items()
        for t in targets
        if m in row_of and t in row_of and row_of[t] > row_of[m]
    )
    assert not upward, upward


def test_readme_reading_order_covers_the_package_with_true_line_counts():
    root, rows = _reading_order()
    assert len(rows) >= 15
    listed = set().union(*(files for files, _ in rows))
    package = {p for p in (root / "opt_jax").rglob("*.py") if p.name != "__init__.py"}
    package -= {root / "opt_jax" / "_deprecation.py"}
    missing = sorted(str(p.relative_to(root)) for p in package - listed)
    assert not missing, f"modules the README's reading order does not list: {missing}"
    for files, stated in rows:
        actual = sum(len(p.read_text().splitlines()) for p in files)
        assert abs(actual - stated) <= max(0.1 * actual, 20), (
            sorted(map(str, files)),
            stated,
            actual,
        )
