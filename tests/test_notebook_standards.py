"""The notebooks held to a standard a script can check (issues 10 and 14).

Reads every committed notebook (no execution) and fails, naming the notebook and the cell, when:
- no cell is tagged ``parameters``, or that cell does not read ``MINIKD_MODE``;
- a notebook that draws with matplotlib embeds no image in its committed outputs (a figure that
  never renders: notebook 02 had no ``%matplotlib inline`` under ``MPLBACKEND=Agg``);
- a committed output holds an error (a cell that failed when the notebook was last run).
Each check is also run on a notebook built with the defect, to show that it can fail.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("[0-9][0-9]_*.ipynb"))
DRAWS = re.compile(r"\bplt\.(show|subplots|figure|imshow|plot)\b|\.savefig\(")


def _source(cell: dict) -> str:
    s = cell.get("source", "")
    return "".join(s) if isinstance(s, list) else s


def problems(nb: dict, name: str) -> list[str]:
    """Every standard the notebook ``nb`` breaks, one message each (empty when it meets all)."""
    cells = nb.get("cells", [])
    found = []
    tagged = [i for i, c in enumerate(cells) if "parameters" in c.get("metadata", {}).get("tags", [])]
    if not tagged:
        found.append(f"{name}: no cell is tagged 'parameters' (papermill and the smoke runs need "
                     "one; tag the cell that sets MODE)")
    elif "MINIKD_MODE" not in _source(cells[tagged[0]]):
        found.append(f"{name}: cell {tagged[0]} is tagged 'parameters' but does not read "
                     "MINIKD_MODE (MODE = os.environ.get('MINIKD_MODE', 'quick'))")
    code = [c for c in cells if c.get("cell_type") == "code"]
    drawing = [i for i, c in enumerate(cells) if c.get("cell_type") == "code" and DRAWS.search(_source(c))]
    images = sum("image/png" in o.get("data", {}) or "image/svg+xml" in o.get("data", {})
                 for c in code for o in c.get("outputs", []))
    if drawing and not images:
        found.append(f"{name}: cells {drawing} draw with matplotlib but the committed outputs embed "
                     "no image; add '%matplotlib inline' to the setup cell and run it again")
    for i, c in enumerate(cells):
        for o in c.get("outputs", []):
            if o.get("output_type") == "error":
                found.append(f"{name}: cell {i} holds an error in its committed output "
                             f"({o.get('ename')}: {o.get('evalue', '')[:80]})")
    return found


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 4, NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_meets_the_standards(path: Path):
    nb = json.loads(path.read_text(encoding="utf-8"))
    assert problems(nb, path.name) == []


def _notebook(cells: list[dict]) -> dict:
    return {"cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": 5}


def _code(source: str, outputs: list | None = None, tags: list | None = None) -> dict:
    return {"cell_type": "code", "source": source, "outputs": outputs or [],
            "metadata": {"tags": tags or []}, "execution_count": None}


PARAMS = _code('MODE = os.environ.get("MINIKD_MODE", "quick")', tags=["parameters"])
PNG = {"output_type": "display_data", "data": {"image/png": "iVBORw0KGgo=", "text/plain": "<Figure>"}}


def test_the_checks_fail_on_a_notebook_with_the_defects():
    good = _notebook([PARAMS, _code("fig, ax = plt.subplots()\nplt.show()", [PNG])])
    assert problems(good, "good") == []
    no_tag = _notebook([_code('MODE = os.environ.get("MINIKD_MODE", "quick")'),
                        _code("plt.show()", [PNG])])
    assert any("tagged 'parameters'" in p for p in problems(no_tag, "no_tag"))
    no_mode = _notebook([_code("MODE = 'quick'", tags=["parameters"]), _code("plt.show()", [PNG])])
    assert any("does not read MINIKD_MODE" in p for p in problems(no_mode, "no_mode"))
    no_image = _notebook([PARAMS, _code("fig, ax = plt.subplots()\nplt.show()", [])])
    assert any("embed no image" in p and "cells [1]" in p for p in problems(no_image, "02"))
    failed = _notebook([PARAMS, _code("1 / 0", [{"output_type": "error", "ename": "ZeroDivisionError",
                                                   "evalue": "division by zero", "traceback": []}])])
    assert any("cell 1 holds an error" in p for p in problems(failed, "failed"))
