"""Workers for tests/test_distributed.py, in an importable module (mp.spawn pickles by name).

Each rank joins a gloo group on 127.0.0.1, runs the scenarios (one spawn for all: starting
processes is the slow part) and saves what the tests compare to ``out_dir/<scenario>_rank<r>.pt``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
from _train_worker import TinySeg, ToyDicts, ce_loss
from torch.utils.data import DataLoader

from minikd import training

DDP_ITERATIONS = 4
DDP_BATCH = 2  # per rank; the single-process twin uses 2 x DDP_BATCH
ENSEMBLE_SEEDS = [5, 6, 7]
ENSEMBLE_KW = {"iterations": 3, "lr": 0.05, "progress": False, "device": "cpu"}


def ddp_model() -> TinySeg:
    torch.manual_seed(0)
    return TinySeg(dropout=0.0)  # no dropout: the 2-rank and 1-rank runs see the same function


def ddp_loader(batch_size: int) -> DataLoader:
    return DataLoader(ToyDicts(8, augment=False), batch_size=batch_size, shuffle=False)


def _ddp(rank: int, out_dir: Path) -> dict:
    if rank == 1:
        torch.manual_seed(99)  # a different init on rank 1: DDP must broadcast rank 0's
    model = ddp_model() if rank == 0 else TinySeg(dropout=0.0)
    history = training.fit(model, ddp_loader(DDP_BATCH), ce_loss, iterations=DDP_ITERATIONS,
                           lr=0.1, seed=0, device="cpu", progress=False, distributed=True,
                           ckpt_dir=out_dir / "ddp_ckpt", ckpt_every=2)
    return {"state": model.state_dict(), "loss": history["loss"]}


def _ensemble(rank: int, out_dir: Path) -> dict:
    trained = []
    real_fit = training.fit

    def recording_fit(model, *args, **kw):
        trained.append(kw["seed"])
        return real_fit(model, *args, **kw)

    training.fit = recording_fit
    members = training.train_ensemble(TinySeg, len(ENSEMBLE_SEEDS),
                                      DataLoader(ToyDicts(6), batch_size=2, shuffle=True),
                                      ce_loss, seeds=ENSEMBLE_SEEDS, **ENSEMBLE_KW)
    return {"trained_seeds": trained, "states": [m.state_dict() for m in members]}


def worker(rank: int, world_size: int, port: int, scenarios: str, out_dir: str) -> None:
    """Run the comma-separated scenarios ("ddp", "ensemble") on this rank."""
    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size)
    try:
        for name in scenarios.split(","):
            result = {"ddp": _ddp, "ensemble": _ensemble}[name](rank, Path(out_dir))
            torch.save(result, Path(out_dir) / f"{name}_rank{rank}.pt")
    finally:
        dist.destroy_process_group()
