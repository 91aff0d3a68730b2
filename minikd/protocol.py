"""The fair-comparison protocol of Niemann et al. (2023, §4): tune the baseline as hard as the method.

A KD gain is the difference between two trainings, so it is only as trustworthy as the weaker of
the two. Niemann et al. tune the initial learning rate μ(0) and the weight decay γ **separately**
for the student alone and for the student with teacher (stage 1), then the temperature τ of the
pixel-wise loss (stage 2), then each extra loss term **in isolation** with its own weight sweep
(stage 3), and report every final number as mean ± std over seeds, underlining the results
within one std of the best. ``fair_protocol`` runs these stages on top of
``training.grid_search``; selection reads one metric (the validation split), the final table
another (a held-out split that no selection saw).

Built on ``training.grid_search`` (kept in training.py, where notebook 01 found it); this module
holds the protocol and its tables, because training.py already holds the training loop, the zoo
and the results bookkeeping. Taught in notebooks/06_fair_baselines.ipynb.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from minikd.losses import cross_entropy
from minikd.models import pspnet
from minikd.training import fit, grid_search

__all__ = [
    "PAPER_LAMBDAS",
    "PAPER_LR_GRID",
    "PAPER_TAUS",
    "PAPER_WD_GRID",
    "TERM_NAMES",
    "Runs",
    "best_row",
    "fair_protocol",
    "final_table",
    "lr_wd_table",
    "pspnet_teacher",
    "within_one_std",
]

#: Niemann Tables 2a/3a: μ(0) per student (EffNet, ResNet) and γ.
PAPER_LR_GRID = {"EffNet": [1e-1, 5e-2, 1e-2, 5e-3], "ResNet": [5e-2, 1e-2, 5e-3]}
PAPER_WD_GRID = [5e-4, 5e-5, 5e-6]
#: Niemann Table 4.
PAPER_TAUS = [1, 2, 3, 4, 6, 8]
#: Niemann Table 5 a/b/c: the weight sweeps of the extra terms.
PAPER_LAMBDAS = {"pa": [1e-3, 1e-2, 1e-1, 1e0, 1e1], "ho": [1e-4, 1e-3, 1e-2, 1e-1],
                 "ifv": [1e-4, 1e-3, 1e-2, 1e-1, 1e0, 1e1, 5e1, 1e2]}
TERM_NAMES = {"pa": "L_PA", "ho": "L_HO", "ifv": "L_IFV"}


class Runs:
    """``train_eval`` with a memory: a configuration and seed already trained is not trained again.

    The stages share runs (stage 2's τ = 1 is stage 1's best KD point, the final table's first
    seed is the selection run), so the memory is what keeps the protocol affordable. It also
    counts the trainings and their wall time (the protocol's cost, Niemann Table 8's spirit).

    Args:
        train_eval: ``train_eval(kd=, lr=, weight_decay=, tau=, term=, lam=, seed=)`` trains one
            student and returns ``{metric: number}`` (e.g. ``{"val": 0.41, "test": 0.39}``);
            ``kd=False`` is student-only (τ, term and λ are then ignored).
    """

    def __init__(self, train_eval: Callable[..., Mapping[str, float]]) -> None:
        self.train_eval = train_eval
        self.memory: dict[tuple, dict[str, float]] = {}
        self.time_s = 0.0

    @staticmethod
    def key(kd: bool, lr: float, weight_decay: float, tau: float = 1.0, term: str | None = None,
            lam: float = 0.0, seed: int = 0) -> tuple:
        """One configuration; student-only ignores τ, term and λ."""
        if not kd:
            tau, term, lam = 1.0, None, 0.0
        if term is None:
            lam = 0.0
        return (bool(kd), float(lr), float(weight_decay), float(tau), term, float(lam), int(seed))

    def __call__(self, **config: Any) -> dict[str, float]:
        key = self.key(**config)
        if key not in self.memory:
            t0 = time.perf_counter()
            kd, lr, wd, tau, term, lam, seed = key
            self.memory[key] = dict(self.train_eval(kd=kd, lr=lr, weight_decay=wd, tau=tau,
                                                    term=term, lam=lam, seed=seed))
            self.time_s += time.perf_counter() - t0
        return self.memory[key]

    def __len__(self) -> int:
        return len(self.memory)


def best_row(rows: Sequence[Mapping[str, Any]], metric: str) -> Mapping[str, Any]:
    """The row with the highest ``<metric>_mean`` (the first one on ties)."""
    if not rows:
        raise ValueError("no rows to choose from; the grid was empty.")
    return max(rows, key=lambda r: r[f"{metric}_mean"])


def within_one_std(rows: Sequence[Mapping[str, Any]], metric: str) -> list[bool]:
    """Niemann's underline: mean ≥ best mean − the best row's std (the best row included)."""
    best = best_row(rows, metric)
    bar = best[f"{metric}_mean"] - best[f"{metric}_std"]
    return [r[f"{metric}_mean"] >= bar for r in rows]


def _check_protocol_args(lr_grid: Sequence[float], wd_grid: Sequence[float],
                         taus: Sequence[float], terms: Mapping[str, Sequence[float]],
                         selection_seeds: Sequence[int], final_seeds: Sequence[int],
                         default: Mapping[str, float] | None) -> None:
    for name, values in (("lr_grid", lr_grid), ("wd_grid", wd_grid), ("taus", taus),
                         ("selection_seeds", selection_seeds), ("final_seeds", final_seeds)):
        if len(values) == 0:
            raise ValueError(f"{name} is empty; give at least one value (Niemann's grids: "
                             "minikd.protocol.PAPER_LR_GRID, PAPER_WD_GRID, PAPER_TAUS).")
    unknown = sorted(set(terms) - set(TERM_NAMES))
    if unknown:
        raise ValueError(f"unknown extra terms {unknown}; expected some of {list(TERM_NAMES)} "
                         "(SKD pair-wise, SKD holistic, IFVD).")
    if 1 not in [float(t) for t in taus]:
        raise ValueError(f"taus={list(taus)} lacks τ = 1, the setting of stage 1; add it.")
    if default is not None and (default["lr"] not in lr_grid
                                or default["weight_decay"] not in wd_grid):
        raise ValueError(f"default={dict(default)} is not a point of the grid (lr {list(lr_grid)}, "
                         f"weight_decay {list(wd_grid)}); put it in, so that the tuned baseline "
                         "is compared with it on the same runs.")


def fair_protocol(train_eval: Callable[..., Mapping[str, float]], *, lr_grid: Sequence[float],
                  wd_grid: Sequence[float], taus: Sequence[float],
                  terms: Mapping[str, Sequence[float]], selection_seeds: Sequence[int],
                  final_seeds: Sequence[int], select: str = "val", report: str = "test",
                  default: Mapping[str, float] | None = None,
                  runs: Runs | None = None) -> dict[str, Any]:
    """Niemann et al.'s protocol: stage 1 μ(0) × γ per arm, stage 2 τ, stage 3 each term alone.

    Selection uses ``select`` averaged over ``selection_seeds``; the final table (Niemann Table 6:
    CE; CE + L_PI; CE + L_PI + each extra term) reports ``report`` as mean ± std over
    ``final_seeds``, with Niemann's marks: the best row and the rows within one std of it.
    With a ``default`` setting (e.g. SKD's μ(0) = 1e-2, γ = 5e-4, τ = 1), the record also holds
    the "published-style" comparison: both arms at the default, over ``final_seeds``.

    Args:
        train_eval: trains one student; see ``Runs``.
        lr_grid: μ(0) values (``PAPER_LR_GRID``).
        wd_grid: γ values (``PAPER_WD_GRID``).
        taus: stage 2's τ values, including 1 (``PAPER_TAUS``).
        terms: {"pa" | "ho" | "ifv": λ values} for stage 3 (``PAPER_LAMBDAS``); {} skips it.
        selection_seeds: seeds averaged for every choice (the paper: one run per grid point).
        final_seeds: seeds of the final numbers (the paper: 4 runs; n is reported).
        select: the metric that chooses (a validation split).
        report: the metric of the final table (a split no choice saw).
        default: {"lr", "weight_decay"}, a grid point: the untuned "published-style" setting.
        runs: a ``Runs`` to share with other comparisons (default: a new one).

    Returns:
        A JSON-able record: ``"stage1"`` {"student", "kd": grid rows}, ``"best"`` (per arm),
        ``"stage2"`` rows and ``"best_tau"``, ``"stage3"`` {term: rows} and ``"best_lam"``,
        ``"final"`` (Table 6 rows: ``"row"``, ``"config"``, ``"<report>_mean/_std"``, ``"n"``,
        ``"best"``, ``"within_one_std"``), ``"default"`` (when given), ``"edges"`` (a note for
        every choice on the edge of a grid of 3 or more values), ``"settings"``, ``"n_runs"``
        and ``"time_s"``.

    References:
        Niemann et al., "Towards Comparable Knowledge Distillation in Semantic Image
        Segmentation", arXiv:2309.03659, §4, §5.4-5.6, Tables 2-6. Taught in
        notebooks/06_fair_baselines.ipynb.
    """
    _check_protocol_args(lr_grid, wd_grid, taus, terms, selection_seeds, final_seeds, default)
    runs = runs or Runs(train_eval)
    n0, t0 = len(runs), runs.time_s
    grid = {"lr": list(lr_grid), "weight_decay": list(wd_grid)}
    stage1 = {arm: grid_search(lambda seed, kd=kd, **p: runs(kd=kd, seed=seed, **p), grid,
                               selection_seeds)
              for arm, kd in (("student", False), ("kd", True))}
    best = {arm: {k: best_row(rows, select)[k] for k in ("lr", "weight_decay")}
            for arm, rows in stage1.items()}
    stage2 = grid_search(lambda seed, **p: runs(kd=True, seed=seed, **best["kd"], **p),
                         {"tau": list(taus)}, selection_seeds)
    best_tau = best_row(stage2, select)["tau"]
    kd_best = {**best["kd"], "tau": best_tau}
    stage3 = {t: grid_search(lambda seed, t=t, **p: runs(kd=True, seed=seed, term=t, **kd_best,
                                                         **p), {"lam": list(lams)},
                             selection_seeds)
              for t, lams in terms.items()}
    best_lam = {t: best_row(rows, select)["lam"] for t, rows in stage3.items()}
    configs = [("CE", {"kd": False, **best["student"]}), ("CE + L_PI", {"kd": True, **kd_best})]
    configs += [(f"CE + L_PI + {TERM_NAMES[t]}", {"kd": True, **kd_best, "term": t,
                                                   "lam": best_lam[t]}) for t in terms]
    final = _final_rows(runs, configs, final_seeds, report)
    record: dict[str, Any] = {
        "settings": {"lr_grid": list(lr_grid), "wd_grid": list(wd_grid), "taus": list(taus),
                     "terms": {t: list(v) for t, v in terms.items()},
                     "selection_seeds": list(selection_seeds), "final_seeds": list(final_seeds),
                     "select": select, "report": report},
        "stage1": stage1, "best": best, "stage2": stage2, "best_tau": best_tau,
        "stage3": stage3, "best_lam": best_lam, "final": final,
    }
    record["edges"] = _edge_notes({**{f"{arm}: μ(0)": (b["lr"], lr_grid) for arm, b in best.items()},
                                   **{f"{arm}: γ": (b["weight_decay"], wd_grid)
                                      for arm, b in best.items()},
                                   "τ": (best_tau, taus),
                                   **{f"λ of {TERM_NAMES[t]}": (v, terms[t])
                                      for t, v in best_lam.items()}})
    if default is not None:
        record["default"] = _final_rows(
            runs, [("CE (default)", {"kd": False, **default}),
                   ("CE + L_PI (default, τ = 1)", {"kd": True, **default})], final_seeds, report)
    record["n_runs"], record["time_s"] = len(runs) - n0, runs.time_s - t0
    return record


def _edge_notes(chosen: Mapping[str, tuple[float, Sequence[float]]]) -> list[str]:
    """A note for every choice that lies on the edge of a grid of 3 or more values: the optimum
    may lie beyond it, so the grid should be extended before the choice is trusted."""
    notes = []
    for name, (value, grid) in chosen.items():
        if len(grid) >= 3 and value in (min(grid), max(grid)):
            side = "smallest" if value == min(grid) else "largest"
            notes.append(f"{name} = {value:g} is the {side} value of the grid {list(grid)}: "
                         "extend the grid beyond it before trusting the choice")
    return notes


def _final_rows(runs: Runs, configs: Sequence[tuple[str, Mapping[str, Any]]],
                seeds: Sequence[int], report: str) -> list[dict[str, Any]]:
    rows = []
    for name, config in configs:
        (row,) = grid_search(lambda _, seed, c=config: runs(seed=seed, **c), {"_": [None]},
                             seeds)
        row.pop("_")
        per_seed = [runs(seed=s, **config)[report] for s in seeds]
        rows.append({"row": name, "config": dict(config), **row, f"{report}_runs": per_seed})
    marks = within_one_std(rows, report)
    top = best_row(rows, report)
    for row, mark in zip(rows, marks):
        row["best"], row["within_one_std"] = row is top, mark
    return rows


def _cell(mean: float, std: float | None = None, *, bold: bool = False, under: bool = False,
          scale: float = 100.0, digits: int = 1) -> str:
    text = f"{scale * mean:.{digits}f}" + ("" if std is None else f" ± {scale * std:.{digits}f}")
    text = f"<u>{text}</u>" if under else text
    return f"**{text}**" if bold else text


def lr_wd_table(rows: Sequence[Mapping[str, Any]], metric: str, title: str = "") -> str:
    """Niemann Tables 2a/3a: one row per γ, one column per μ(0), the best cell in bold (%)."""
    lrs = sorted({r["lr"] for r in rows}, reverse=True)
    wds = sorted({r["weight_decay"] for r in rows}, reverse=True)
    top = best_row(rows, metric)
    cell = {(r["weight_decay"], r["lr"]): r for r in rows}
    lines = [f"| γ \\ μ(0) {title} | " + " | ".join(f"{lr:g}" for lr in lrs) + " |",
             "|---" * (len(lrs) + 1) + "|"]
    for wd in wds:
        vals = [_cell(cell[wd, lr][f"{metric}_mean"], bold=cell[wd, lr] is top) for lr in lrs]
        lines.append(f"| {wd:g} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def final_table(rows: Sequence[Mapping[str, Any]], metric: str, column: str,
                paper: Sequence[str] | None = None) -> str:
    """Niemann Table 6: which terms (x), mean ± std (%), best bold, within one std underlined."""
    head = "| L_PI | L_PA | L_HO | L_IFV | " + column + (" | paper (Cityscapes, ResNet)"
                                                          if paper else "") + " |"
    lines = [head, "|---" * (5 + bool(paper)) + "|"]
    for i, r in enumerate(rows):
        c = r["config"]
        marks = ["x" if c["kd"] else "", *("x" if c.get("term") == t else "" for t in TERM_NAMES)]
        value = _cell(r[f"{metric}_mean"], r[f"{metric}_std"], bold=r["best"],
                      under=r["within_one_std"])
        extra = f" | {paper[i]}" if paper else ""
        lines.append("| " + " | ".join(marks) + f" | {value} (n = {r['n_seeds']}){extra} |")
    return "\n".join(lines)


def pspnet_teacher(weights: str | os.PathLike | None, train_set: Dataset, num_classes: int, *,
                   batch_size: int = 8, iterations: int = 40000,
                   ckpt_dir: str | os.PathLike | None = None, device: str | None = None,
                   pretrained: bool = True, num_workers: int = 4) -> nn.Module:
    """Full mode's teacher: PSPNet-R101 (output stride 8), loaded from a file or trained here.

    Niemann et al. use SKD's released Cityscapes teacher (78.24 val mIoU); its download links
    are dead (SKD issues #4/#7). Give ``weights``: a state dict of
    ``models.pspnet("resnet101", num_classes)`` that you trained or converted, or leave it
    empty to train the teacher here by SKD's teacher recipe (SGD, μ(0) 1e-2, γ 5e-4, poly,
    heads at 10× the backbone's rate), resumable from ``ckpt_dir``.

    Args:
        weights: path of the teacher's state dict, or None / "" to train it.
        train_set: augmented labelled training images (dicts with "image" and "mask").
        num_classes: 19 for Cityscapes.
        batch_size, iterations: SKD: 8 and 40k.
        ckpt_dir: resumable checkpoints of the teacher's training.
        device: where to train.
        pretrained: ImageNet weights for the backbone before training (never with ``weights``).
        num_workers: data loader workers.

    Returns:
        The teacher in eval mode.

    References:
        Niemann et al. 2023 §5.2; Liu et al. 2019 (SKD). Taught in
        notebooks/06_fair_baselines.ipynb (full mode).
    """
    if weights:
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"MINIKD_TEACHER={str(weights)!r} is not a file; expected the "
                                    "state dict of models.pspnet('resnet101', num_classes), or "
                                    "leave it empty to train the teacher here.")
        net = pspnet("resnet101", num_classes)
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return net.eval()
    net = pspnet("resnet101", num_classes, pretrained=pretrained)
    loader = DataLoader(train_set, batch_size=batch_size, shuffle=True, drop_last=True,
                        num_workers=min(num_workers, os.cpu_count() or 1))
    fit(net, loader, lambda logits, batch: cross_entropy(logits, batch["mask"]),
        iterations=iterations, optimizer="sgd", lr=1e-2, weight_decay=5e-4, decoder_lr_mult=10.0,
        device=device, ckpt_dir=ckpt_dir, seed=0, desc="teacher PSPNet-R101")
    return net.eval()
