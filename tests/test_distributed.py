"""Two-process tests of minikd.training on CPU with the gloo backend (mp.spawn, free port).

(a) fit(distributed=True): DistributedDataParallel + DistributedSampler. Both ranks end with the
    same weights, equal (to float rounding) to one process on the full batch of both ranks.
(b) train_ensemble over 2 ranks: member i trains on rank i % 2 only, then every rank holds all
    members, bit-identical to members trained in one process with the same seeds.
"""

from __future__ import annotations

import socket

import pytest
import torch
import torch.multiprocessing as mp
from _dist_worker import (
    DDP_BATCH,
    DDP_ITERATIONS,
    ENSEMBLE_KW,
    ENSEMBLE_SEEDS,
    ddp_loader,
    ddp_model,
    worker,
)
from _train_worker import TinySeg, ToyDicts, ce_loss
from torch.utils.data import DataLoader

from minikd.training import CKPT_NAME, fit, load_checkpoint, train_ensemble

pytestmark = [pytest.mark.skipif(not torch.distributed.is_available(),
                                 reason="torch.distributed is not available"),
              pytest.mark.usefixtures("one_thread")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    """Both scenarios in one 2-process run (each process start costs seconds)."""
    out = tmp_path_factory.mktemp("dist")
    mp.spawn(worker, args=(2, _free_port(), "ddp,ensemble", str(out)), nprocs=2, join=True)
    return out


def _results(out, scenario: str) -> list[dict]:
    return [torch.load(out / f"{scenario}_rank{r}.pt", weights_only=True) for r in range(2)]



@pytest.mark.slow
def test_ddp_ranks_agree_and_match_one_process_on_the_full_batch(spawned):
    r0, r1 = _results(spawned, "ddp")
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), f"ranks disagree on {k}"
    assert r0["loss"] != r1["loss"]  # each rank saw its own half of the data
    single = ddp_model()
    fit(single, ddp_loader(2 * DDP_BATCH), ce_loss, iterations=DDP_ITERATIONS, lr=0.1, seed=0,
        device="cpu", progress=False)
    for k, v in single.state_dict().items():
        torch.testing.assert_close(r0["state"][k], v, rtol=1e-5, atol=1e-6)
    ckpt = load_checkpoint(spawned / "ddp_ckpt" / CKPT_NAME)  # written once, by rank 0
    assert ckpt["step"] == DDP_ITERATIONS and len(ckpt["ranks"]) == 2


@pytest.mark.slow
def test_train_ensemble_spreads_members_over_ranks(spawned):
    r0, r1 = _results(spawned, "ensemble")
    assert r0["trained_seeds"] == ENSEMBLE_SEEDS[0::2]
    assert r1["trained_seeds"] == ENSEMBLE_SEEDS[1::2]
    reference = train_ensemble(TinySeg, len(ENSEMBLE_SEEDS),
                               DataLoader(ToyDicts(6), batch_size=2, shuffle=True), ce_loss,
                               seeds=ENSEMBLE_SEEDS, distributed=False, **ENSEMBLE_KW)
    for i, member in enumerate(reference):
        for k, v in member.state_dict().items():
            assert torch.equal(r0["states"][i][k], v), f"member {i} {k} differs on rank 0"
            assert torch.equal(r1["states"][i][k], v), f"member {i} {k} differs on rank 1"
