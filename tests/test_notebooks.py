"""The notebooks in experiments/notebooks run top to bottom (nbclient, a real Jupyter kernel),
their plots render, and each .ipynb matches its diff-friendly jupytext source (.py)."""

from pathlib import Path

import jupytext
import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parent.parent / "experiments" / "notebooks"
SOURCES = sorted(NOTEBOOKS.glob("*.py"))


def test_there_are_the_three_notebooks():
    assert {p.stem for p in SOURCES} >= {"quickstart", "interpretability", "finetune"}


@pytest.mark.parametrize("source", SOURCES, ids=[p.stem for p in SOURCES])
def test_notebook_runs_and_its_plots_render(source, tmp_path):
    notebook = nbformat.read(source.with_suffix(".ipynb"), as_version=4)
    paired = jupytext.read(source)
    code = lambda nb: [c.source for c in nb.cells if c.cell_type == "code"]  # noqa: E731
    assert code(notebook) == code(paired), f"run `jupytext --sync {source}`: out of date"
    client = NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": NOTEBOOKS}}
    )
    client.execute()  # raises CellExecutionError naming the failing cell
    plotting = [c for c in notebook.cells if c.cell_type == "code" and "plt.show()" in c.source]
    assert plotting, "every notebook has a plot"
    for cell in plotting:
        images = [o for o in cell.outputs if "image/png" in o.get("data", {})]
        assert images, f"a plotting cell produced no image:\n{cell.source[:200]}"
