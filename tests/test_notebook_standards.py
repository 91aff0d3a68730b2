"""The notebooks held to a standard a script can check (issues 10 and 14).

Reads every committed notebook (no execution) and fails, naming the notebook and the cell, when:
- no cell is tagged ``parameters``, or that cell does not read ``MINIKD_MODE`` and
  ``MINIKD_SMOKE`` (the smoke runs of full mode, ``make smoke``);
- any other cell reads ``SMOKE`` (full mode and its smoke run must run the same code);
- a notebook that draws with matplotlib embeds no image in its committed outputs (a figure that
  never renders: notebook 02 had no ``%matplotlib inline`` under ``MPLBACKEND=Agg``);
- a committed output holds an error or a traceback (a cell that failed when the notebook was last
  run), is longer than MAX_OUTPUT_LINES lines, or holds a progress bar's carriage-return debris;
- the code cells were not executed top to bottom in one run (execution counts 1, 2, 3, ...), so
  the outputs a reader sees on GitHub are not one run's;
- a code cell is longer than MAX_CODE_LINES lines (the house style's "about 30", with room for
  one figure or explorer cell; longer plumbing belongs in the library, a longer lesson step in
  two cells);
- two cells share an id (nbformat 4.5 requires unique ids; a cell copied by a script keeps its
  original's).
Each check is also run on a notebook built with the defect, to show that it can fail.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("[0-9][0-9]_*.ipynb"))
MAX_OUTPUT_LINES = 100
MAX_CODE_LINES = 40
SMOKE_READ = re.compile(r"\bSMOKE\b|MINIKD_SMOKE")
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
    else:
        for var, how in (("MINIKD_MODE", "MODE = os.environ.get('MINIKD_MODE', 'quick')"),
                         ("MINIKD_SMOKE", "SMOKE = os.environ.get('MINIKD_SMOKE', '0') == '1'")):
            if var not in _source(cells[tagged[0]]):
                found.append(f"{name}: cell {tagged[0]} is tagged 'parameters' but does not read "
                             f"{var} ({how})")
        for i, c in enumerate(cells):
            if i != tagged[0] and c.get("cell_type") == "code" and SMOKE_READ.search(_source(c)):
                found.append(f"{name}: cell {i} reads SMOKE; only the parameters cell may (set a "
                             "parameter there, so the smoke run runs what full mode runs)")
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
            text = _output_text(o)
            if "Traceback (most recent call last)" in text:
                found.append(f"{name}: cell {i} prints a traceback in its committed output")
            if re.search(r"\r(?!\n)", text):
                found.append(f"{name}: cell {i} holds carriage-return debris (a progress bar "
                             "written to a log); run it with TQDM_DISABLE=1 or a notebook bar")
            lines = text.count("\n") + (not text.endswith("\n") and bool(text))
            if lines > MAX_OUTPUT_LINES:
                found.append(f"{name}: cell {i} prints {lines} lines (at most "
                             f"{MAX_OUTPUT_LINES}); summarise it or write it to a file")
    for i, c in enumerate(cells):
        n_lines = _source(c).count("\n") + 1
        if c.get("cell_type") == "code" and n_lines > MAX_CODE_LINES:
            found.append(f"{name}: code cell {i} has {n_lines} lines (at most {MAX_CODE_LINES}); "
                         "split the step in two or move its plumbing into the library")
    ids = [c.get("id") for c in cells if c.get("id")]
    if len(ids) != len(set(ids)):
        found.append(f"{name}: cell ids repeat ({sorted({i for i in ids if ids.count(i) > 1})}); "
                     "give every cell its own id")
    counts = [(i, c.get("execution_count")) for i, c in enumerate(cells)
              if c.get("cell_type") == "code"]
    for k, (i, n) in enumerate(counts, start=1):
        if n != k:
            found.append(f"{name}: code cell {i} has execution count {n}, expected {k}: the "
                         "committed outputs are not one top-to-bottom run; restart and run all")
            break
    return found


def _output_text(output: dict) -> str:
    """The text of one output: a stream's text or a result's text/plain."""
    text = output.get("text", output.get("data", {}).get("text/plain", ""))
    return "".join(text) if isinstance(text, list) else text


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 4, NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_meets_the_standards(path: Path):
    nb = json.loads(path.read_text(encoding="utf-8"))
    assert problems(nb, path.name) == []


def _code(source: str, outputs: list | None = None, tags: list | None = None,
          count: int | None = None) -> dict:
    return {"cell_type": "code", "source": source, "outputs": outputs or [],
            "metadata": {"tags": tags or []}, "execution_count": count}


def _notebook(cells: list[dict]) -> dict:
    """A notebook whose code cells ran in order (unless a cell set its own count)."""
    code = [c for c in cells if c["cell_type"] == "code"]
    for k, c in enumerate(code, start=1):
        c["execution_count"] = k if c["execution_count"] is None else c["execution_count"]
    return {"cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": 5}


PARAMS_SRC = ('MODE = os.environ.get("MINIKD_MODE", "quick")\n'
              'SMOKE = os.environ.get("MINIKD_SMOKE", "0") == "1"')
PARAMS = _code(PARAMS_SRC, tags=["parameters"])
PNG = {"output_type": "display_data", "data": {"image/png": "iVBORw0KGgo=", "text/plain": "<Figure>"}}


def test_the_checks_fail_on_a_notebook_with_the_defects():
    good = _notebook([PARAMS, _code("fig, ax = plt.subplots()\nplt.show()", [PNG])])
    assert problems(good, "good") == []
    no_tag = _notebook([_code(PARAMS_SRC), _code("plt.show()", [PNG])])
    assert any("tagged 'parameters'" in p for p in problems(no_tag, "no_tag"))
    no_mode = _notebook([_code("MODE = 'quick'", tags=["parameters"]), _code("plt.show()", [PNG])])
    assert any("does not read MINIKD_MODE" in p for p in problems(no_mode, "no_mode"))
    no_smoke = _notebook([_code('MODE = os.environ.get("MINIKD_MODE", "quick")', tags=["parameters"])])
    assert [p for p in problems(no_smoke, "s") if "MINIKD" in p] == [
        ("s: cell 0 is tagged 'parameters' but does not read MINIKD_SMOKE "
        "(SMOKE = os.environ.get('MINIKD_SMOKE', '0') == '1')")]
    branch = _notebook([PARAMS, _code("n = 2 if SMOKE else 10")])
    assert [p for p in problems(branch, "b") if "SMOKE" in p] == [
        ("b: cell 1 reads SMOKE; only the parameters cell may (set a parameter there, so the smoke "
        "run runs what full mode runs)")]
    no_image = _notebook([PARAMS, _code("fig, ax = plt.subplots()\nplt.show()", [])])
    assert any("embed no image" in p and "cells [1]" in p for p in problems(no_image, "02"))
    failed = _notebook([PARAMS, _code("1 / 0", [{"output_type": "error", "ename": "ZeroDivisionError",
                                                   "evalue": "division by zero", "traceback": []}])])
    assert any("cell 1 holds an error" in p for p in problems(failed, "failed"))
    tb = _notebook([PARAMS, _code("run()", [{"output_type": "stream", "name": "stderr", "text":
                                             "Traceback (most recent call last):\n  ...\n"}])])
    assert any("cell 1 prints a traceback" in p for p in problems(tb, "tb"))
    bar = _notebook([PARAMS, _code("fit()", [{"output_type": "stream", "name": "stderr", "text":
                                              " 10%|#   | 1/10\r 20%|##  | 2/10\r"}])])
    assert any("carriage-return debris" in p for p in problems(bar, "bar"))
    long = _notebook([PARAMS, _code("print(x)", [{"output_type": "stream", "name": "stdout",
                                                  "text": "row\n" * 101}])])
    assert any("prints 101 lines" in p for p in problems(long, "long"))
    ok = _notebook([PARAMS, _code("print(x)", [{"output_type": "stream", "name": "stdout",
                                                "text": "row\n" * 100}])])
    assert problems(ok, "ok") == []
    out_of_order = _notebook([PARAMS, _code("a = 1", count=3), _code("b = 2", count=2)])
    assert [p for p in problems(out_of_order, "o")] == [
        ("o: code cell 1 has execution count 3, expected 2: the committed outputs are not one "
        "top-to-bottom run; restart and run all")]
    wall = _notebook([PARAMS, _code("\n".join(["x = 1"] * 41))])
    assert [p for p in problems(wall, "w")] == [
        ("w: code cell 1 has 41 lines (at most 40); split the step in two or move its plumbing "
         "into the library")]
    assert problems(_notebook([PARAMS, _code("\n".join(["x = 1"] * 40))]), "w") == []
    twins = _notebook([PARAMS, {**_code("a = 1"), "id": "x1"}, {**_code("b = 2"), "id": "x1"}])
    assert [p for p in problems(twins, "t")] == ["t: cell ids repeat (['x1']); give every cell its own id"]
    never_run = _notebook([PARAMS, _code("a = 1")])
    never_run["cells"][1]["execution_count"] = None
    assert any("execution count None, expected 2" in p for p in problems(never_run, "n"))
