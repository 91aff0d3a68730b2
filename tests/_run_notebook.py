"""Execute one notebook top to bottom with nbclient and write the executed copy, even on failure.

Usage: python tests/_run_notebook.py NOTEBOOK OUT.ipynb [--timeout S]

Prints each code cell's wall time (so a slow or hung cell is named), and on a failing cell its
source and traceback; the exit status is 1 when a cell failed. For looking at a smoke run's
outputs by hand (the smoke test itself runs the notebooks under nbval, which saves none).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("notebook", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--timeout", type=int, default=900, help="seconds per cell")
    args = parser.parse_args(argv)
    path = args.notebook.resolve()
    nb = nbformat.read(path, as_version=4)
    started: dict[int, float] = {}

    def on_start(cell, cell_index):
        started[cell_index] = time.perf_counter()

    def on_done(cell, cell_index, execute_reply):
        print(f"{path.name} cell {cell_index}: {time.perf_counter() - started[cell_index]:.1f} s",
              flush=True)

    client = NotebookClient(nb, timeout=args.timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}},
                            on_cell_start=on_start, on_cell_executed=on_done)
    t0 = time.perf_counter()
    try:
        client.execute()
        return 0
    except CellExecutionError as err:
        print(f"{path.name} failed:\n{err}", flush=True)
        return 1
    finally:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, args.out)
        print(f"{path.name}: {time.perf_counter() - t0:.0f} s in all; executed copy {args.out}")


if __name__ == "__main__":
    sys.exit(main())
