"""Training and evaluation: the loop every notebook runs, resumable checkpoints, ensembles over
ranks, seeds, grid search and result files.

What is here, in the order a notebook uses it:

==========================  ==================================================================
``set_seed``                 python, numpy and torch (CPU + CUDA) seeds in one call
``fit``                      SGD/AdamW, poly decay, decoder at 10x LR (DUDES §4), AMP and
                             channels_last on a GPU, progress bar, validation, checkpoints
``evaluate``                 mIoU, ECE, uncertainty, OOD and depth metrics in one pass
``train_ensemble``           M members that differ only by seed; spread over torchrun ranks
``grid_search``              mean ± std over seeds for every point of a grid
``save_results``             results/<name>.json, flat, with the mode and the device
==========================  ==================================================================

**Resuming is exact.** ``fit(..., ckpt_dir=d)`` writes ``d/last.pt`` atomically (temporary file
in ``d``, ``fsync``, ``os.replace``) every ``ckpt_every`` steps and at the end. Calling ``fit``
again with the same ``d`` loads it (``torch.load(weights_only=True)``) and continues; on a CPU
the final weights are bit-identical to a run that was never interrupted (tests/test_training.py
kills a training process with SIGKILL to check). A checkpoint holds the model, optimizer,
scheduler, AMP scaler, step and history, and the random state twice:

* the RNG states (python, numpy, torch CPU and CUDA) *after* the last finished step, and
* the RNG states and data-loader generator states at the *start of the current epoch*,
  with the number of batches already taken from it.

On resume the loader's epoch is replayed: the epoch-start states are restored, a fresh iterator
is made (so ``RandomSampler`` draws the same permutation and ``DataLoader`` workers get the same
seeds), the batches already consumed are read again and dropped (costs data loading, not
training), and finally the after-step RNG states are restored, so augmentation and dropout go
on exactly as before. ``DistributedSampler.set_epoch(epoch)`` is called every epoch. One
exception: with ``persistent_workers=True`` the order is exact but random augmentation in the
workers is not (their RNG survives epochs and cannot be rewound). On a GPU the restored state
is the same, but some CUDA kernels are not deterministic: expect equal, not bit-identical,
weights there unless ``set_seed(seed, deterministic=True)``.

**Distributed.** ``torchrun --standalone --nproc_per_node=2 -m minikd.training`` runs the demo
at the bottom of this file. ``fit(..., distributed=True)`` wraps the model in
``DistributedDataParallel`` and gives every rank a ``DistributedSampler`` (the batch size is per
rank); ``train_ensemble`` trains member i on rank ``i % world_size`` and then broadcasts every
member to every rank. On a CPU the backend is gloo (tests/test_distributed.py spawns two).

References:
    Landgraf et al., DUDES (2023), §4 "Training" (SGD 0.01, momentum 0.9, weight decay 5e-4,
    decoder 10x, polynomial decay 0.9). Taught in every notebook from
    notebooks/01_vanilla_kd_temperature.ipynb on.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import random
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

__all__ = [
    "CKPT_NAME",
    "CheckpointError",
    "build_optimizer",
    "class_table",
    "default_results_dir",
    "evaluate",
    "fit",
    "format_mean_std",
    "grid_search",
    "init_distributed",
    "is_main_process",
    "load_checkpoint",
    "load_or_train",
    "pick_threads",
    "poly_scheduler",
    "save_results",
    "set_seed",
    "train_ensemble",
    "train_zoo_entry",
    "zoo_user_dir",
]

CKPT_NAME = "last.pt"
_CKPT_FORMAT = "minikd-checkpoint-1"
_CKPT_KEYS = ("format", "step", "iterations", "model", "optimizer", "scheduler", "scaler",
              "history", "ranks")


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be used: unreadable, foreign, or for another model/run."""


# =========================================================================== seeds and RNG state
def set_seed(seed: int, deterministic: bool = False) -> None:
    """Seed python's ``random``, numpy and torch (CPU and every CUDA device).

    Args:
        seed: a non-negative integer.
        deterministic: also ask for deterministic kernels (``torch.use_deterministic_algorithms``
            with warnings only, cuDNN deterministic, no cuDNN benchmark). Slower on a GPU; not
            needed on a CPU, where minikd's training is already reproducible.

    References:
        PyTorch notes "Reproducibility". Taught in every notebook's setup cell.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed={seed!r}; expected a non-negative integer such as 0.")
    seed = int(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # seeds CUDA too
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def _rng_state() -> dict[str, Any]:
    """Every global RNG state, as tensors and plain types (loadable with weights_only=True)."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def _rng_preserved() -> Iterator[None]:
    """Run a block (e.g. validation) without moving any global RNG of the training run."""
    state = _rng_state()
    try:
        yield
    finally:
        _set_rng_state(state)


# =========================================================================== distributed helpers
def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if _dist_on() else (0, 1)


def is_main_process() -> bool:
    """True on rank 0 of a torchrun job, and always outside torch.distributed."""
    return _rank_world()[0] == 0


def init_distributed(backend: str | None = None) -> tuple[int, int]:
    """Join the process group torchrun describes in the environment (no-op if alone).

    Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``. Uses NCCL on a
    GPU (and pins the process to ``cuda:LOCAL_RANK``) and gloo on a CPU.

    Args:
        backend: force "gloo" or "nccl".

    Returns:
        (rank, world_size); (0, 1) when not launched by torchrun.

    References:
        PyTorch "Getting started with DistributedDataParallel"; torchrun docs.
    """
    if _dist_on():
        return _rank_world()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend or ("nccl" if torch.cuda.is_available() else "gloo"))
    return _rank_world()


def _distributed_loader(loader: DataLoader, seed: int) -> DataLoader:
    """The same loader with a DistributedSampler (shuffling iff the original shuffled)."""
    if isinstance(loader.sampler, DistributedSampler):
        return loader
    if loader.batch_size is None:
        raise ValueError("fit(distributed=True) cannot re-shard a DataLoader built with a custom "
                         "batch_sampler; build it with sampler=DistributedSampler(dataset) "
                         "yourself.")
    sampler = DistributedSampler(loader.dataset, shuffle=isinstance(loader.sampler, RandomSampler),
                                 seed=seed, drop_last=loader.drop_last)
    extra = {"prefetch_factor": loader.prefetch_factor} if loader.num_workers > 0 else {}
    return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=sampler,
                      num_workers=loader.num_workers, collate_fn=loader.collate_fn,
                      pin_memory=loader.pin_memory, drop_last=loader.drop_last,
                      timeout=loader.timeout, worker_init_fn=loader.worker_init_fn,
                      generator=loader.generator, persistent_workers=loader.persistent_workers,
                      **extra)


# =========================================================================== optimizer, schedule
def _param_groups(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(encoder, other): the model's own split (minikd.models), else the same rule by name."""
    if hasattr(model, "encoder_parameters") and hasattr(model, "decoder_parameters"):
        return list(model.encoder_parameters()), list(model.decoder_parameters())
    encoder, other = [], []  # as models.param_groups: a module named "encoder" on the path
    for name, p in model.named_parameters():
        (encoder if "encoder" in name.split(".")[:-1] else other).append(p)
    return encoder, other


def build_optimizer(model: nn.Module, optimizer: str = "sgd", lr: float = 0.01,
                    momentum: float = 0.9, weight_decay: float = 5e-4,
                    decoder_lr_mult: float = 10.0) -> torch.optim.Optimizer:
    """SGD or AdamW with the encoder at ``lr`` and decoder + heads at ``lr * decoder_lr_mult``.

    The encoder is what ``minikd.models.param_groups`` finds (any module named ``encoder``);
    a model without one trains every parameter at ``lr``.

    Args:
        model: the model (not the DDP wrapper).
        optimizer: "sgd" (DUDES) or "adamw".
        lr: the encoder's initial learning rate (DUDES: 0.01).
        momentum: SGD momentum (DUDES: 0.9); ignored by AdamW.
        weight_decay: DUDES: 5e-4.
        decoder_lr_mult: DUDES: 10.

    Returns:
        The optimizer; its groups are named "encoder" and "decoder".

    References:
        Landgraf et al., DUDES (2023), §4 "Training".
    """
    if optimizer not in ("sgd", "adamw"):
        raise ValueError(f"optimizer={optimizer!r}; expected 'sgd' (DUDES) or 'adamw'.")
    if not lr > 0 or not decoder_lr_mult > 0:
        raise ValueError(f"lr={lr!r} and decoder_lr_mult={decoder_lr_mult!r} must be > 0.")
    encoder, other = (list(filter(lambda p: p.requires_grad, ps)) for ps in _param_groups(model))
    if not encoder:
        groups = [{"params": other, "lr": lr, "name": "all"}]
    else:
        groups = [{"params": encoder, "lr": lr, "name": "encoder"},
                  {"params": other, "lr": lr * decoder_lr_mult, "name": "decoder"}]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("the model has no trainable parameters (all requires_grad=False).")
    if optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)


def poly_scheduler(optimizer: torch.optim.Optimizer, iterations: int,
                   power: float = 0.9) -> torch.optim.lr_scheduler.LambdaLR:
    """Polynomial decay per iteration: lr = lr_initial · (1 − it / iterations)^power.

    Args:
        optimizer: its groups' current ``lr`` are the initial learning rates.
        iterations: total optimizer steps.
        power: DUDES: 0.9.

    Returns:
        A ``LambdaLR``; call ``.step()`` after every optimizer step.

    References:
        Landgraf et al., DUDES (2023), §4, the equation after "polynomial learning rate
        scheduling" (from DeepLab, Chen et al. 2017).
    """
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: max(0.0, 1.0 - it / iterations) ** power)


# =========================================================================== checkpoints
_TMP_CHARS = "[a-z0-9_]{8}"  # the random part of a tempfile.mkstemp name


def _temporary_name(path: Path) -> tuple[str, str]:
    """(prefix, suffix) of the temporary files ``_atomic_write`` writes ``path`` through."""
    return f".{path.name}.", ".tmp"


def _remove_stale_temporaries(path: Path) -> list[Path]:
    """Delete the temporary files an earlier write of ``path`` left behind when it was killed.

    Only files next to ``path`` named exactly like ``_atomic_write``'s temporaries of this very
    target (``.<name>.XXXXXXXX.tmp``, or ``<name>XXXXXXXX.tmp`` as older minikd versions wrote
    teacher caches) are removed; other files, and the temporaries of other targets, are never
    touched. Assumes one writer per target at a time, as ``fit`` (rank 0) and the cache/zoo
    writers are.

    Returns:
        The files removed.
    """
    prefix, suffix = _temporary_name(path)
    pattern = re.compile(f"(?:{re.escape(prefix)}|{re.escape(path.name)}){_TMP_CHARS}"
                         + re.escape(suffix))
    removed = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(path.parent):
            if entry.is_file(follow_symlinks=False) and pattern.fullmatch(entry.name):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    removed.append(Path(entry.path))
    return removed


def _load_error_reason(err: BaseException) -> str:
    """What went wrong in a ``torch.load(weights_only=True)``, in words, for an error message.

    torch's own message for a file with pickled objects suggests ``weights_only=False``, which
    would run arbitrary code from the file; minikd never repeats that advice.
    """
    if "weights_only" in str(err):  # "Weights only load failed ... weights_only=False ..."
        return (f"{type(err).__name__}: the safe loader found no plain tensors and containers "
                "there, only corrupted bytes or pickled Python objects, which minikd never "
                "unpickles")
    first = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def _atomic_write(path: Path, write: Callable[[Any], None]) -> None:
    """write(file) into a temporary file next to ``path``, fsync, then rename over ``path``.

    Temporary files of the same ``path`` left by an earlier write that was killed half-way are
    removed first (``_remove_stale_temporaries``).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    prefix, suffix = _temporary_name(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable (not on every OS)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check a checkpoint written by ``fit`` (safely: ``weights_only=True``).

    Args:
        path: the file, e.g. ``ckpt_dir / "last.pt"``.

    Returns:
        The checkpoint dict (``"model"`` is a state dict for ``model.load_state_dict``).

    Raises:
        CheckpointError: unreadable (truncated, random bytes) or not a minikd checkpoint.
    """
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - garbage bytes make the unpickler raise almost any
        # error (UnpicklingError, EOFError, IndexError, UnicodeDecodeError, ...): say it in words
        raise CheckpointError(
            f"{path} is not a readable checkpoint ({_load_error_reason(e)}). It is truncated, "
            "corrupted or not a torch file. Delete it to train from scratch, or pass another "
            "ckpt_dir.") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != _CKPT_FORMAT:
        keys = sorted(map(str, ckpt))[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(
            f"{path} is a torch file but not a minikd checkpoint (found {keys}; expected a dict "
            f"with format={_CKPT_FORMAT!r} written by minikd.training.fit). Delete it or pass "
            "another ckpt_dir.")
    missing = [k for k in _CKPT_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path} lacks {missing}; it is incomplete. Delete it to start "
                              "afresh.")
    return ckpt


def _restore(ckpt: dict, path: Path, parts: dict[str, Any], iterations: int) -> None:
    """Load a checked checkpoint into model/optimizer/scheduler/scaler (and a stateful loss_fn),
    or explain why not."""
    if ckpt["iterations"] != iterations:
        raise CheckpointError(
            f"{path} belongs to a run of {ckpt['iterations']} iterations, this one asks for "
            f"{iterations}; the learning-rate schedule depends on it. Use the same iterations or "
            "another ckpt_dir.")
    names = ["model", "optimizer", "scheduler", "scaler"]
    if "loss_fn" in parts and "loss_fn" in ckpt:
        names.append("loss_fn")
    elif "loss_fn" in parts:  # written before loss states were saved, or by a stateless loss
        _say(f"fit: {path} holds no loss_fn state; the loss object (e.g. a discriminator) starts "
             "afresh")
    for name in names:
        try:
            parts[name].load_state_dict(ckpt[name])
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            detail = " ".join(str(e).split())[:600]
            raise CheckpointError(f"{path}: its {name} state does not fit this run ({detail}). "
                                  "Was it written for another model or optimizer? Delete it or "
                                  "pass another ckpt_dir.") from None


# =========================================================================== data stream
class _DataStream:
    """Endless batches from a DataLoader, epoch after epoch, replayable from (epoch, position)."""

    def __init__(self, loader: DataLoader):
        self.loader, self.epoch, self.pos = loader, 0, 0
        self._it: Iterator | None = None
        self._start: dict[str, Any] | None = None

    def _generators(self) -> list[torch.Generator]:
        found: list[torch.Generator] = []
        for g in (getattr(self.loader, "generator", None),
                  getattr(getattr(self.loader, "sampler", None), "generator", None)):
            if isinstance(g, torch.Generator) and all(g is not h for h in found):
                found.append(g)
        return found

    def _set_epoch(self) -> None:
        for s in (getattr(self.loader, "sampler", None),
                  getattr(getattr(self.loader, "batch_sampler", None), "sampler", None)):
            if hasattr(s, "set_epoch"):
                s.set_epoch(self.epoch)

    def _begin_epoch(self) -> None:
        self._set_epoch()
        self._start = {"rng": _rng_state(), "gens": [g.get_state() for g in self._generators()]}
        self._it, self.pos = iter(self.loader), 0

    def next(self) -> Any:
        if self._it is None:
            self._begin_epoch()
        try:
            batch = next(self._it)
        except StopIteration:
            self.epoch += 1
            self._begin_epoch()
            try:
                batch = next(self._it)
            except StopIteration:
                raise ValueError("train_loader yielded no batch; is the data set empty, or "
                                 "smaller than one batch with drop_last=True?") from None
        self.pos += 1
        return batch

    def reseed(self, seed: int) -> None:
        """Seed the loader's and sampler's own torch.Generator (if any) like the global RNG."""
        for g in self._generators():
            g.manual_seed(seed)

    def state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "pos": self.pos, "start": self._start}

    def restore(self, state: Mapping[str, Any]) -> None:
        """Re-create the iterator of the saved epoch and skip the batches already consumed."""
        self.epoch, self._start = state["epoch"], state["start"]
        if self._start is None:
            return
        _set_rng_state(self._start["rng"])
        for g, s in zip(self._generators(), self._start["gens"]):
            g.set_state(s)
        self._set_epoch()
        self._it = iter(self.loader)
        for i in range(state["pos"]):
            if next(self._it, None) is None:
                raise CheckpointError(f"the checkpoint was {state['pos']} batches into epoch "
                                      f"{self.epoch}, but train_loader now has only {i}. Resume "
                                      "with the same data set and batch size.")
        self.pos = state["pos"]

    def close(self) -> None:
        self._it = None  # shuts DataLoader workers down


# =========================================================================== fit
def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _amp_dtype(amp: bool | str | None, device: torch.device) -> torch.dtype | None:
    """"auto"/True: bf16 (or fp16 where bf16 is missing) on CUDA, off elsewhere."""
    if amp in ("auto", True):
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp in (False, None):
        return None
    if amp in ("bf16", "fp16"):
        if amp == "fp16" and device.type != "cuda":
            raise ValueError("amp='fp16' needs a CUDA device; use amp='bf16' or False on "
                             f"{device}.")
        return torch.bfloat16 if amp == "bf16" else torch.float16
    raise ValueError(f"amp={amp!r}; expected 'auto', True, False, 'bf16' or 'fp16'.")


def _to_device(batch: Any, device: torch.device, channels_last: bool) -> dict[str, Any]:
    if not isinstance(batch, Mapping) or "image" not in batch:
        got = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
        raise ValueError(f"the loader must yield dicts with an 'image' key (minikd data format); "
                         f"got {got}. Return {{'image': x, 'mask': y, ...}} from the data set.")
    out = {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v
           for k, v in batch.items()}
    if channels_last:
        out["image"] = out["image"].contiguous(memory_format=torch.channels_last)
    return out


def _split_loss(result: Any) -> tuple[Tensor, dict[str, Tensor]]:
    loss, terms = result if isinstance(result, tuple) else (result, {})
    if not isinstance(loss, Tensor) or loss.numel() != 1 or not isinstance(terms, Mapping):
        raise ValueError(f"loss_fn must return a scalar Tensor or (Tensor, dict of terms); got "
                         f"{type(loss).__name__} {tuple(getattr(loss, 'shape', ()))} and "
                         f"{type(terms).__name__}.")
    terms = {k: (v.detach() if isinstance(v, Tensor) else torch.tensor(float(v))).float()
             .reshape(()).to(loss.device) for k, v in terms.items()}
    return loss.reshape(()), terms


def _new_history() -> dict[str, Any]:
    return {"step": [], "loss": [], "lr": [], "images_per_s": [], "terms": {}, "val": [],
            "time_s": 0.0, "resumed_from": None}


class _Log:
    """Buffers per-step losses on the device; one host sync per flush (every ``log_every``)."""

    def __init__(self, history: dict, iterations: int, bar: Any):
        self.history, self.iterations, self.bar = history, iterations, bar
        self.pending: list[tuple[int, Tensor, dict[str, Tensor], float]] = []
        self.images, self.t0 = 0, time.perf_counter()

    def record(self, step: int, loss: Tensor, terms: dict[str, Tensor], lr: float,
               n_images: int) -> None:
        self.pending.append((step, loss.detach().float(), terms, lr))
        self.images += n_images

    def flush(self) -> None:
        if not self.pending:
            return
        flat = torch.stack([v for _, loss, terms, _ in self.pending
                            for v in (loss, *terms.values())]).cpu().tolist()
        rate = self.images / max(time.perf_counter() - self.t0, 1e-9)
        h, i = self.history, 0
        for step, _, terms, lr in self.pending:
            loss, values = flat[i], dict(zip(terms, flat[i + 1:i + 1 + len(terms)]))
            i += 1 + len(terms)
            if not math.isfinite(loss):
                shown = ", ".join(f"{k}={v:.4g}" for k, v in values.items()) or "none returned"
                raise FloatingPointError(
                    f"the loss is {loss} at step {step} of {self.iterations} (loss terms: "
                    f"{shown}); training stopped. Usual causes: a learning rate too high, NaN or "
                    "inf in the inputs or targets, fp16 overflow (try amp=False). The last "
                    "checkpoint, if any, is intact.")
            for key, value in (("step", step), ("loss", loss), ("lr", lr),
                               ("images_per_s", rate)):
                h[key].append(value)
            for k, v in values.items():
                h["terms"].setdefault(k, []).append(v)
        self.bar.update(len(self.pending))
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{rate:.1f}")
        self.pending, self.images, self.t0 = [], 0, time.perf_counter()


def _progress_bar(total: int, initial: int, enabled: bool, desc: str | None) -> Any:
    from tqdm.auto import tqdm

    env_off = os.environ.get("TQDM_DISABLE", "").strip().lower() not in ("", "0", "false")
    # In a notebook (tqdm's widget bar) a finished bar is removed: a cell that trains a dozen
    # students shows the one running, not a dozen stale bars. In a terminal it stays.
    in_kernel = "ipykernel" in sys.modules
    return tqdm(total=total, initial=initial, desc=desc or "fit", dynamic_ncols=True,
                leave=not in_kernel, disable=not enabled or env_off or not is_main_process())


def _check_fit_args(iterations: int, ckpt_every: int | None, val_every: int | None,
                    log_every: int | None) -> None:
    for name, v in (("iterations", iterations), ("ckpt_every", ckpt_every),
                    ("val_every", val_every), ("log_every", log_every)):
        if v is None and name != "iterations":
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}={v!r}; expected a positive integer (number of optimizer "
                             "steps).")


def _save(path: Path, parts: dict[str, Any], step: int, iterations: int, history: dict,
          stream: _DataStream, distributed: bool) -> None:
    """Gather every rank's RNG/data state (DDP); rank 0 (or a lone process) writes atomically."""
    mine = {"rng": _rng_state(), "data": stream.state()}
    ranks = [mine]
    if distributed:
        ranks = [None] * dist.get_world_size()
        dist.all_gather_object(ranks, mine)
    if not distributed or is_main_process():
        payload = {"format": _CKPT_FORMAT, "step": step, "iterations": iterations,
                   **{k: part.state_dict() for k, part in parts.items()},  # + "loss_fn"
                   "history": history, "ranks": ranks}
        _atomic_write(path, lambda f: torch.save(payload, f))
    if distributed:
        dist.barrier()


def _resume(path: Path, parts: dict[str, Any], iterations: int, stream: _DataStream,
            distributed: bool) -> tuple[int, dict]:
    ckpt = load_checkpoint(path)
    _restore(ckpt, path, parts, iterations)
    rank, world = _rank_world() if distributed else (0, 1)
    if len(ckpt["ranks"]) != world:
        raise CheckpointError(f"{path} was written by {len(ckpt['ranks'])} process(es), this run "
                              f"has {world}. Resume with as many processes or use another "
                              "ckpt_dir.")
    if ckpt["step"] < iterations:
        stream.restore(ckpt["ranks"][rank]["data"])
    _set_rng_state(ckpt["ranks"][rank]["rng"])
    history = ckpt["history"]
    history["resumed_from"] = ckpt["step"]
    return ckpt["step"], history


def fit(model: nn.Module, train_loader: DataLoader, loss_fn: Callable[..., Any], *,
        iterations: int, optimizer: str = "sgd", lr: float = 0.01, momentum: float = 0.9,
        weight_decay: float = 5e-4, decoder_lr_mult: float = 10.0, poly_power: float = 0.9,
        device: str | torch.device | None = None, amp: bool | str = "auto",
        channels_last: bool | str = "auto", ckpt_dir: str | os.PathLike | None = None,
        ckpt_every: int | None = None, val_loader: DataLoader | None = None,
        val_every: int | None = None, val_fn: Callable[..., dict] | None = None,
        progress: bool = True, seed: int | None = None, log_every: int | None = None,
        distributed: bool = False, desc: str | None = None) -> dict[str, Any]:
    """Train ``model`` for ``iterations`` optimizer steps; resume from ``ckpt_dir`` if possible.

    Each step: ``outputs = model(batch["image"])``, ``loss_fn(outputs, batch)`` → loss or
    (loss, {name: term}), backward, optimizer step, scheduler step. The loader is cycled
    (as many epochs as needed). Learning rates follow ``build_optimizer`` and ``poly_scheduler``.

    Args:
        model: an ``nn.Module``; moved to ``device`` (and to channels_last on CUDA).
        train_loader: yields dicts with at least ``"image"`` (minikd's data format).
        loss_fn: ``loss_fn(outputs, batch)``; e.g. ``losses.DistillationLoss(...)``. One with
            ``state_dict``/``load_state_dict`` (e.g. holding a ``losses.HolisticLoss``, whose
            discriminator trains alongside) is checkpointed under "loss_fn" and restored on
            resume; a checkpoint without that key still loads, the loss then starting afresh.
        iterations: number of optimizer steps (DUDES: 200 epochs of batch 16).
        optimizer: "sgd" (DUDES) or "adamw".
        lr: the encoder's initial learning rate (DUDES: 0.01).
        momentum: SGD momentum (DUDES: 0.9).
        weight_decay: DUDES: 5e-4.
        decoder_lr_mult: decoder and heads learn this many times faster (DUDES: 10).
        poly_power: exponent of the polynomial decay (DUDES: 0.9).
        device: default "cuda" if available, else "cpu".
        amp: "auto" = bf16 autocast on CUDA (fp16 + GradScaler where bf16 is missing), off on a
            CPU; or True / False / "bf16" / "fp16".
        channels_last: "auto" = on CUDA only; or True / False.
        ckpt_dir: directory for ``last.pt``; if it holds one, training resumes from it (and a
            finished run just loads its weights). Prints which path it took.
        ckpt_every: steps between checkpoints (default: every 10 % of ``iterations``); a
            checkpoint is always written at the end.
        val_loader: optional validation data, run every ``val_every`` steps and at the end.
        val_every: steps between validations (default: only at the end).
        val_fn: ``val_fn(model, val_loader) -> dict`` (default: ``evaluate`` with the class
            count read from the logits). Validation does not move the training RNGs.
        progress: show a tqdm bar (loss, lr, images/s); also off if ``TQDM_DISABLE=1``.
        seed: ``set_seed(seed)`` before training (data order, augmentation, dropout); under
            DDP rank r uses ``seed + r`` (the DistributedSampler shares ``seed``). A
            ``torch.Generator`` of the loader or its sampler is re-seeded with ``seed`` too.
        log_every: steps between host syncs that log the loss and check it is finite (default
            1 on a CPU, 10 on a GPU). A NaN/inf loss raises ``FloatingPointError`` naming the
            step and the loss terms; with ``log_every=1`` before the weights see it.
        distributed: wrap in ``DistributedDataParallel`` and shard the loader with a
            ``DistributedSampler`` (call ``init_distributed()`` first).
        desc: label of the progress bar.

    Returns:
        The history: ``"step"``, ``"loss"``, ``"lr"`` (encoder group), ``"images_per_s"`` (lists,
        one entry per step), ``"terms"`` ({name: list}), ``"val"`` (list of metric dicts with
        their ``"step"``), ``"time_s"`` (wall time of all sessions) and ``"resumed_from"``.

    References:
        Landgraf et al., DUDES (2023), §4 "Training". Taught in
        notebooks/01_vanilla_kd_temperature.ipynb onwards.
    """
    _check_fit_args(iterations, ckpt_every, val_every, log_every)
    if distributed and not _dist_on():
        raise ValueError("fit(distributed=True) needs torch.distributed initialised; call "
                         "minikd.training.init_distributed() under torchrun first.")
    device = _resolve_device(device)
    use_cl = channels_last is True or (channels_last == "auto" and device.type == "cuda")
    rank, _ = _rank_world()
    if seed is not None:
        set_seed(seed + (rank if distributed else 0))
    model.to(device)
    if use_cl:
        model.to(memory_format=torch.channels_last)
    loader = _distributed_loader(train_loader, seed or 0) if distributed else train_loader
    net = model
    if distributed:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    opt = build_optimizer(model, optimizer, lr, momentum, weight_decay, decoder_lr_mult)
    dtype = _amp_dtype(amp, device)
    parts = {"model": model, "optimizer": opt, "scheduler": poly_scheduler(opt, iterations,
                                                                             poly_power),
             "scaler": torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)}
    if callable(getattr(loss_fn, "state_dict", None)) and callable(
            getattr(loss_fn, "load_state_dict", None)):
        parts["loss_fn"] = loss_fn  # a stateful loss (a discriminator, ...) resumes with the model
    stream, history, start = _DataStream(loader), _new_history(), 0
    if seed is not None:
        stream.reseed(seed)
    path = Path(ckpt_dir) / CKPT_NAME if ckpt_dir is not None else None
    if path is not None and path.exists():
        start, history = _resume(path, parts, iterations, stream, distributed)
        _say(f"fit: resumed {path} at step {start}/{iterations}"
             + (" (finished: weights loaded, nothing to train)" if start >= iterations else ""))
    elif path is not None:
        _say(f"fit: no checkpoint in {path.parent}; training from scratch for {iterations} steps")
    ckpt_every = ckpt_every or max(1, iterations // 10)
    log_every = log_every or (1 if device.type == "cpu" else 10)
    val_every = val_every or iterations
    bar = _progress_bar(iterations, start, progress, desc)
    log, t_start = _Log(history, iterations, bar), time.perf_counter()
    model.train()
    try:
        for step in range(start + 1, iterations + 1):
            batch = _to_device(stream.next(), device, use_cl)
            with _autocast(device, dtype):
                loss, terms = _split_loss(loss_fn(net(batch["image"]), batch))
            log.record(step, loss, terms, opt.param_groups[0]["lr"], len(batch["image"]))
            due_val = val_loader is not None and (step % val_every == 0 or step == iterations)
            due_ckpt = path is not None and (step % ckpt_every == 0 or step == iterations)
            if step % log_every == 0 or due_val or due_ckpt or step == iterations:
                log.flush()  # raises FloatingPointError before the weights see a NaN
            _optimizer_step(parts, loss)
            if due_val:
                history["val"].append({"step": step,
                                       **_validate(model, val_loader, val_fn, device)})
                model.train()
            if due_ckpt:
                history["time_s"] += time.perf_counter() - t_start
                t_start = time.perf_counter()
                _save(path, parts, step, iterations, history, stream, distributed)
    finally:
        bar.close()
        stream.close()
    history["time_s"] += time.perf_counter() - t_start if start < iterations else 0.0
    return history


def _optimizer_step(parts: dict[str, Any], loss: Tensor) -> None:
    """Backward (through the AMP scaler, a no-op without fp16), step, then the poly schedule."""
    opt, scaler = parts["optimizer"], parts["scaler"]
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    parts["scheduler"].step()


def _autocast(device: torch.device, dtype: torch.dtype | None) -> Any:
    return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()


def _say(msg: str) -> None:
    if is_main_process():
        print(msg, flush=True)


def _validate(model: nn.Module, loader: DataLoader, val_fn: Callable | None,
              device: torch.device) -> dict[str, Any]:
    with _rng_preserved():
        out = (val_fn or (lambda m, dl: evaluate(m, dl, None, device=device)))(model, loader)
    if not isinstance(out, Mapping):
        raise TypeError(f"val_fn must return a dict of metrics; got {type(out).__name__}.")
    return {k: _plain(v) for k, v in out.items()}


def _plain(v: Any) -> Any:
    """Tensors/numpy -> floats or lists (checkpoint- and JSON-friendly)."""
    if isinstance(v, (Tensor, np.ndarray, np.generic)):
        v = v.tolist()
    if isinstance(v, Mapping):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


# =========================================================================== evaluate
class _Evaluation:
    """Streaming sums for every metric of ``evaluate``; bounded memory (pixel subsample)."""

    def __init__(self, num_classes: int | None, ignore_index: int, n_bins: int,
                 max_pixels: int, n_items: int | None, seg_uncertainty: str = "auto"):
        from minikd import metrics

        self.m, self.num_classes, self.ignore = metrics, num_classes, ignore_index
        self.seg_uncertainty = seg_uncertainty
        self.n_bins, self.max_pixels, self.n_items = n_bins, max_pixels, n_items
        self.meter = None
        self.ece_sums = torch.zeros(3, n_bins + 1, dtype=torch.float64)  # count, conf, acc
        self.counts = dict.fromkeys(("n_ac", "n_au", "n_ic", "n_iu"), 0)
        self.depth_counts: dict[str, int] = {}  # the same four counts for depth (Eq. 13)
        self.unc_sum = self.unc_count = None
        self.samples: dict[str, list[Tensor]] = {}
        self.depth: dict[str, float] = {}
        self.rate: float | None = None

    def _keep(self, shape: torch.Size, index: int, device: torch.device) -> Tensor | None:
        """Deterministic pixel subsample: per batch a fixed-seed mask, rate set on batch 0."""
        if self.rate is None:  # items x pixels per image, from the first batch
            total = (self.n_items or 0) * shape[-2] * shape[-1]  # unknown size: keep all
            self.rate = min(1.0, self.max_pixels / total) if total else 1.0
        if self.rate >= 1.0:
            return None
        gen = torch.Generator().manual_seed(index)
        return (torch.rand(shape, generator=gen) < self.rate).to(device)

    def _sample(self, keep: Tensor | None, **maps: Tensor) -> None:
        for k, v in maps.items():
            self.samples.setdefault(k, []).append((v if keep is None else v[keep]).cpu())

    def update(self, out: dict[str, Tensor], batch: dict[str, Any], index: int,
               with_uncertainty: bool) -> None:
        if "probs" in out and "mask" in batch:
            self._segmentation(out, batch, index, with_uncertainty)
        if "depth" in out and "depth" in batch:
            self._depth(out, batch, with_uncertainty)

    def _segmentation(self, out: dict, batch: dict, index: int, with_unc: bool) -> None:
        probs, labels = out["probs"].float(), batch["mask"]
        if "pred" in out:  # an ensemble's argmax of the mean
            pred, conf = out["pred"], probs.max(1).values
        else:  # one max gives both (max(1) = argmax(1), ties included, and faster on a CPU)
            conf, pred = probs.max(1)
        if self.meter is None:
            self.num_classes = self.num_classes or probs.shape[1]
            self.meter = self.m.SegmentationMeter(self.num_classes, self.ignore)
        self.meter.update(pred, labels)
        valid = labels != self.ignore
        conf = conf[valid]
        idx = torch.bucketize(conf, torch.linspace(0, 1, self.n_bins + 1, device=conf.device),
                              right=True) - 1  # same bins as metrics.ece
        for row, w in enumerate((None, conf.double(), (pred == labels)[valid].double())):
            self.ece_sums[row] += torch.bincount(idx, weights=w, minlength=self.n_bins + 1).cpu()
        unc = self._segmentation_uncertainty(out, probs) if with_unc else None
        if unc is not None:
            self._uncertainty(unc, pred, labels, batch.get("ood_mask"), index)

    def _segmentation_uncertainty(self, out: dict, probs: Tensor) -> Tensor | None:
        """The score of ``evaluate(seg_uncertainty=...)``: the predictive entropy of the (mean)
        softmax ``probs`` (EMUFormer Eq. 3), or ``out["uncertainty"]`` (None if absent)."""
        if self.seg_uncertainty == "entropy":
            return torch.special.entr(probs).sum(1)  # -Σ p log p, 0·log 0 = 0
        unc = out.get("uncertainty")
        if unc is None and self.seg_uncertainty == "uncertainty":
            raise ValueError(f"evaluate(seg_uncertainty='uncertainty') but the model's output "
                             f"has keys {sorted(out)}, no 'uncertainty' (an ensemble's DUDES "
                             "std or a DUDES student's head). Use seg_uncertainty='entropy' for "
                             "the entropy of the softmax, or 'auto' to skip it.")
        return None if unc is None else unc.float()

    def _uncertainty(self, unc: Tensor, pred: Tensor, labels: Tensor, ood: Tensor | None,
                     index: int) -> None:
        counts = self.m.uncertainty_accuracy(unc, pred, labels, "mean", self.ignore)
        for k in self.counts:
            self.counts[k] += counts[k]
        n = torch.bincount(pred.reshape(-1).cpu(), minlength=self.num_classes).double()
        mean = self.m.class_wise_uncertainty(unc, pred, self.num_classes)
        sums = torch.where(n > 0, mean * n, torch.zeros_like(mean))
        self.unc_sum = sums if self.unc_sum is None else self.unc_sum + sums
        self.unc_count = n if self.unc_count is None else self.unc_count + n
        keep = self._keep(labels.shape, index, labels.device)
        self._sample(keep, unc=unc, pred=pred, labels=labels)
        if ood is not None:  # batches without a mask do not enter the OOD metrics
            ood = ood.bool()
            self._sample(keep, ood_unc=unc, ood=ood, ood_valid=ood | (labels != self.ignore))

    def _depth(self, out: dict, batch: dict, with_unc: bool) -> None:
        pred, target = out["depth"].float(), batch["depth"].float()
        valid = target > 0
        n = int(valid.sum())
        if n == 0:
            return
        d = self.m.depth_metrics(pred, target, valid)
        acc = self.depth
        acc["n"] = acc.get("n", 0) + n
        acc["sq"] = acc.get("sq", 0.0) + d["rmse"] ** 2 * n
        for k in ("abs_rel", "delta1", "delta2", "delta3"):
            acc[k] = acc.get(k, 0.0) + d[k] * n
        if with_unc and "depth_var" in out:  # δ1-accurate vs certain (per-image mean, Eq. 13)
            counts = self.m.depth_uncertainty_accuracy(pred, target, out["depth_var"].float(),
                                                       valid)
            for k in ("n_ac", "n_au", "n_ic", "n_iu"):
                self.depth_counts[k] = self.depth_counts.get(k, 0) + counts[k]

    def compute(self, removal_fractions: Sequence[float] | None) -> dict[str, Any]:
        res: dict[str, Any] = {}
        if self.meter is not None:
            seg = self.meter.compute()
            res.update(miou=seg["miou"], iou=seg["iou"].tolist(), pixel_acc=seg["pixel_acc"])
            count, conf, acc = self.ece_sums
            res["ece"] = float((acc - conf).abs().sum() / count.sum()) if count.sum() else math.nan
        if self.unc_count is not None:
            res.update(self._uncertainty_results(removal_fractions))
        if self.depth:
            n = self.depth["n"]
            res["depth_rmse"] = math.sqrt(self.depth["sq"] / n)
            res.update({f"depth_{k}": self.depth[k] / n
                        for k in ("abs_rel", "delta1", "delta2", "delta3")})
        if self.depth_counts:
            ratios = self.m._certainty_ratios(self.depth_counts)
            res.update({f"depth_{k}": v for k, v in ratios.items()})
        return res

    def _uncertainty_results(self, fractions: Sequence[float] | None) -> dict[str, Any]:
        m = self.m
        cls = torch.where(self.unc_count > 0, self.unc_sum / self.unc_count.clamp_min(1), math.nan)
        res = {**m._certainty_ratios(self.counts),
               "class_uncertainty": cls.tolist(), "m_unc": float(cls.nanmean())}
        s = {k: torch.cat([t.reshape(-1) for t in v]) for k, v in self.samples.items()}
        valid = s["labels"] != self.ignore
        # One stable sort of the valid pixels' uncertainty serves AUROC, AP, FPR@95 of errors
        # and the removal curve (metrics.removal_curve breaks ties by this stable order too).
        unc, pred, labels = s["unc"][valid], s["pred"][valid], s["labels"][valid]
        m._check_no_nan(unc, "the uncertainty's labelled pixels")
        order = torch.sort(unc, descending=True, stable=True).indices
        res.update({f"error_{k}": v for k, v in m._detection_of(
            m._binary_curve(unc, pred != labels, order, stacklevel=4)).items()})
        if "ood" in s:  # its own pixels (unknown objects are void in the labels): one sort
            res.update({f"ood_{k}": v for k, v in m.detection_metrics(
                s["ood_unc"], s["ood"], s["ood_valid"]).items()})
        if fractions is not None:
            fr = m._check_fractions(fractions, "removal_fractions")
            curve = m._removal_of(pred[order], labels[order], self.num_classes, fr)
            res["removal_fractions"], res["removal_miou"] = list(fractions), curve.tolist()
        res["pixel_subsample_rate"] = self.rate
        return res


SEG_UNCERTAINTY: tuple[str, ...] = ("auto", "entropy", "uncertainty")


def _model_outputs(model: nn.Module, x: Tensor, size: torch.Size,
                   statistics: Sequence[str]) -> dict[str, Tensor]:
    """probs/pred/uncertainty/depth of a model, DUDES student or ensemble (``.predict``, asked
    for ``statistics`` only when it accepts ``statistics=``)."""
    predict = getattr(model, "predict", None)
    if callable(predict):
        from minikd.ensembles import _takes_statistics

        out = dict(predict(x, statistics=statistics) if _takes_statistics(predict)
                   else predict(x))
    else:
        raw = model(x)
        out = dict(raw) if isinstance(raw, Mapping) else {"logits": raw}
        if "logits" in out:
            out["probs"] = out["logits"].float().softmax(1)
    if "probs" in out and out["probs"].shape[-2:] != size:  # e.g. full-resolution labels
        out["probs"] = F.interpolate(out["probs"].float(), size=size, mode="bilinear",
                                     align_corners=False)
        out.pop("pred", None)
    for k in ("uncertainty", "depth", "depth_var"):
        if k in out and out[k].shape[-2:] != size:
            out[k] = F.interpolate(out[k].float()[:, None], size=size, mode="bilinear",
                                   align_corners=False)[:, 0]
    return out


@torch.no_grad()
def evaluate(model_or_ensemble: nn.Module, loader: DataLoader, num_classes: int | None = None,
             *, device: str | torch.device | None = None, ignore_index: int = 255,
             ood: bool = False, with_uncertainty: bool = True, n_bins: int = 15,
             max_pixels: int = 2_000_000,
             removal_fractions: Sequence[float] | None = None,
             seg_uncertainty: str = "auto") -> dict[str, Any]:
    """Every metric of the notebooks in one pass over ``loader`` (eval mode, no gradients).

    Works with a plain segmenter (logits), a DUDES student (``{"logits", "uncertainty"}``), an
    ensemble or MC dropout (anything with ``.predict(x)`` returning ``"probs"``/``"pred"``/
    ``"uncertainty"``), and depth models (``"depth"``). Outputs at another resolution than the
    labels are resized bilinearly.

    Exact over all pixels (streaming): mIoU, IoU, pixel accuracy, ECE, p(accurate|certain),
    p(uncertain|inaccurate), PAvPU (per-image mean threshold), class-wise uncertainty, depth
    metrics and, when the model yields "depth_var", the same three for depth (a pixel is
    accurate when δ1 = max(μ/y, y/μ) < 1.25, EMUFormer Eq. 13; certain when its variance is
    below its image's mean variance). Over a deterministic pixel subsample when the data set
    has more than ``max_pixels`` pixels: AUROC/AP/FPR@95 of errors and of unknown objects, the
    removal curve.

    Args:
        model_or_ensemble: the model; it is moved to ``device`` and its train/eval mode restored.
        loader: yields dicts with "image" and "mask" (and "depth", "ood_mask" where available).
        num_classes: C; None reads it from the first output.
        device: default "cuda" if available, else "cpu".
        ignore_index: void label.
        ood: require "ood_mask" in the batches (OOD metrics are computed whenever it is there).
        with_uncertainty: compute the uncertainty metrics (segmentation: see
            ``seg_uncertainty``; depth: when the model yields "depth_var").
        n_bins: ECE bins (15, as ``metrics.ece``).
        max_pixels: cap on the pixels kept for the rank-based metrics.
        removal_fractions: e.g. ``[0, 0.1, ..., 0.9]`` to add DUDES' removal curve.
        seg_uncertainty: which segmentation uncertainty the metrics score. "auto" (default):
            ``out["uncertainty"]`` when the model yields it (an ensemble's DUDES std, a DUDES
            student's head), else none. "entropy": the predictive entropy of the (mean) softmax
            H[p] (EMUFormer Eq. 3, what EMUFormer evaluates), computed here from the probs that
            are scored, so it is exact for any model; an ensemble is then not asked for its
            "uncertainty" at all. "uncertainty": ``out["uncertainty"]``, a ValueError if absent.

    Returns:
        Flat dict of floats and lists: "miou", "iou", "pixel_acc", "ece"; with uncertainty
        "error_auroc", "error_ap", "error_fpr95", "p_accurate_certain", "p_uncertain_inaccurate",
        "pavpu", "class_uncertainty", "m_unc", "pixel_subsample_rate" (+ "removal_miou"); with
        OOD masks "ood_auroc", "ood_ap", "ood_fpr95"; with depth "depth_rmse", "depth_abs_rel",
        "depth_delta1..3"; with depth and "depth_var" (and ``with_uncertainty``)
        "depth_p_accurate_certain", "depth_p_uncertain_inaccurate", "depth_pavpu".

    References:
        DUDES Tables 1-2 and Fig. 4; EMUFormer §4 and Eq. 13; Mukhoti & Gal 2018.
        Taught in notebooks/03_dudes.ipynb and notebook 04 (EMUFormer).
    """
    if seg_uncertainty not in SEG_UNCERTAINTY:
        raise ValueError(f"seg_uncertainty={seg_uncertainty!r}; expected one of "
                         f"{list(SEG_UNCERTAINTY)}: 'entropy' scores H[p] of the softmax "
                         "(EMUFormer Eq. 3), 'uncertainty' the model's 'uncertainty' output, "
                         "'auto' the latter when present.")
    model = getattr(model_or_ensemble, "module", model_or_ensemble)  # unwrap DDP
    device = _resolve_device(device)
    try:
        n_items = len(loader.dataset)
    except (AttributeError, TypeError):  # iterable data set: keep every pixel (or pass a cap)
        n_items = None
    acc = _Evaluation(num_classes, ignore_index, n_bins, max_pixels, n_items, seg_uncertainty)
    was_training = model.training
    model.to(device).eval()
    seen_ood = False
    statistics = ("probs", "pred", "depth", "depth_var") + (  # what an ensemble's predict computes
        ("uncertainty",) if with_uncertainty and seg_uncertainty != "entropy" else ())
    try:
        for i, batch in enumerate(loader):
            batch = _to_device(batch, device, False)
            seen_ood |= "ood_mask" in batch
            size = batch["mask"].shape[-2:] if "mask" in batch else batch["image"].shape[-2:]
            out = _model_outputs(model, batch["image"], size, statistics)
            acc.update(out, batch, i, with_uncertainty)
    finally:
        model.train(was_training)
    if ood and not seen_ood:
        raise ValueError("evaluate(ood=True) but no batch has an 'ood_mask'; use "
                         "ToyCity(..., ood=True) or a data set with unknown-object masks.")
    return acc.compute(removal_fractions)


# =========================================================================== ensembles
def _member_seeds(n: int, seeds: Sequence[int] | None) -> list[int]:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n={n!r}; expected a positive number of members.")
    seeds = list(range(n)) if seeds is None else [int(s) for s in seeds]
    if len(seeds) != n or len(set(seeds)) != n:
        raise ValueError(f"seeds={seeds}; expected {n} distinct seeds (members differ only by "
                         "seed).")
    return seeds


def _broadcast_members(members: list[nn.Module], histories: list[Any], world: int) -> None:
    """Member i lives on rank i % world; send its weights and history to every rank."""
    device = torch.device("cuda", torch.cuda.current_device()) \
        if dist.get_backend() == "nccl" else torch.device("cpu")
    for i, member in enumerate(members):
        member.to(device)
        for t in member.state_dict().values():  # same order on every rank
            dist.broadcast(t, src=i % world)
        box = [histories[i]]
        dist.broadcast_object_list(box, src=i % world)
        histories[i] = box[0]


def train_ensemble(make_member: Callable[[], nn.Module], n: int,
                   train_loader: DataLoader | None = None, loss_fn: Callable | None = None, *,
                   seeds: Sequence[int] | None = None,
                   train_fn: Callable[[nn.Module, int], Any] | None = None,
                   ckpt_dir: str | os.PathLike | None = None, distributed: bool | str = "auto",
                   return_histories: bool = False, **fit_kwargs: Any) -> Any:
    """Train ``n`` deep-ensemble members that differ only by seed.

    Member i: ``set_seed(seeds[i])``, ``make_member()`` (random init), then
    ``fit(member, train_loader, loss_fn, seed=seeds[i], ckpt_dir=ckpt_dir/member_i,
    **fit_kwargs)`` — its own data order, augmentation and dropout — or ``train_fn(member,
    seeds[i])`` if given. Under torchrun (``distributed="auto"`` and ``WORLD_SIZE`` > 1) member i
    is trained on rank ``i % world_size`` only, then broadcast, so every rank returns all ``n``
    trained members, identical to a single-process run with the same seeds.

    Args:
        make_member: builds one untrained member, no arguments.
        n: number of members (DUDES: 10).
        train_loader: passed to ``fit`` (shared; each member gets its own order via its seed).
        loss_fn: passed to ``fit``.
        seeds: one per member (default ``0..n-1``).
        train_fn: ``train_fn(member, seed) -> history`` instead of ``fit``.
        ckpt_dir: members checkpoint to ``ckpt_dir/member_<i>`` (so the ensemble resumes).
        distributed: "auto", True (require torchrun) or False (train all members here).
        return_histories: also return the members' histories.
        **fit_kwargs: e.g. ``iterations=``, ``lr=``, ``progress=``.

    Returns:
        The list of members (on this rank's device), or (members, histories).

    References:
        Lakshminarayanan et al. 2017; DUDES §3.1 (10 members, random initialisation).
        Taught in notebooks/02_unet_ensemble_weighting.ipynb and notebooks/03_dudes.ipynb.
    """
    seeds = _member_seeds(n, seeds)
    if train_fn is None and (train_loader is None or loss_fn is None):
        raise ValueError("train_ensemble needs train_loader and loss_fn (for fit) or train_fn.")
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed is True or (distributed == "auto" and launched):
        init_distributed()
    rank, world = _rank_world() if distributed else (0, 1)
    if distributed is True and world == 1:
        raise ValueError("train_ensemble(distributed=True) needs torchrun with WORLD_SIZE > 1.")
    members, histories = [], [None] * n
    for i, seed in enumerate(seeds):
        set_seed(seed)
        members.append(make_member())
        if i % world != rank:
            continue
        if train_fn is not None:
            histories[i] = train_fn(members[i], seed)
        else:
            member_dir = None if ckpt_dir is None else Path(ckpt_dir) / f"member_{i}"
            histories[i] = fit(members[i], train_loader, loss_fn, seed=seed, ckpt_dir=member_dir,
                               distributed=False, desc=f"member {i + 1}/{n}",
                               **_fit_kwargs_for_member(fit_kwargs))
    if world > 1:
        _broadcast_members(members, histories, world)
    return (members, histories) if return_histories else members


def _fit_kwargs_for_member(kwargs: dict[str, Any]) -> dict[str, Any]:
    clash = {"seed", "ckpt_dir", "distributed", "desc"} & kwargs.keys()
    if clash:
        raise ValueError(f"train_ensemble sets {sorted(clash)} per member itself; use seeds= and "
                         "ckpt_dir= of train_ensemble instead.")
    return kwargs


# =========================================================================== grid search, results
def grid_search(train_eval_fn: Callable[..., Mapping[str, float]],
                grid: Mapping[str, Sequence[Any]], seeds: Sequence[int]) -> list[dict[str, Any]]:
    """Run ``train_eval_fn(**point, seed=s)`` for every grid point and seed; mean ± std.

    Args:
        train_eval_fn: trains and evaluates one configuration, returns {metric: number}.
        grid: {parameter: list of values}; every combination is run.
        seeds: seeds per combination (the fair-baselines notebook uses 3).

    Returns:
        One row per combination: the parameters, ``"n_seeds"``, and for each numeric metric
        ``"<metric>_mean"`` and ``"<metric>_std"`` (sample std, ddof=1; 0.0 for one seed).

    References:
        Taught in notebook 06 (fair baselines).
    """
    if not grid or any(isinstance(v, (str, bytes)) or len(v) == 0 for v in grid.values()):
        raise ValueError(f"grid={dict(grid)!r}; expected {{name: [value, ...]}} with non-empty "
                         "lists, e.g. {'lr': [0.01, 0.001]}.")
    seeds = list(seeds)
    if not seeds:
        raise ValueError("seeds is empty; give at least one seed, e.g. [0, 1, 2].")
    rows = []
    for values in itertools.product(*grid.values()):
        point = dict(zip(grid, values))
        runs = [dict(train_eval_fn(**point, seed=s)) for s in seeds]
        row: dict[str, Any] = {**point, "n_seeds": len(seeds)}
        for key in runs[0]:
            vals = [_plain(r[key]) for r in runs]
            if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
                row[f"{key}_mean"] = statistics.fmean(vals)
                row[f"{key}_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        rows.append(row)
    return rows


def format_mean_std(row: Mapping[str, Any], metric: str, digits: int = 3) -> str:
    """``"0.512 ± 0.013"`` from a ``grid_search`` row."""
    return f"{row[f'{metric}_mean']:.{digits}f} ± {row[f'{metric}_std']:.{digits}f}"


def _idle_cores(interval_s: float = 0.25) -> float | None:
    """How many cores sat idle over ``interval_s`` (Linux /proc/stat), or None where unknown."""
    def snapshot() -> tuple[int, int] | None:
        try:
            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        return fields[3] + (fields[4] if len(fields) > 4 else 0), sum(fields)  # idle + iowait
    a = snapshot()
    time.sleep(interval_s)
    b = snapshot()
    if a is None or b is None or b[1] == a[1]:
        return None
    return os.cpu_count() * (b[0] - a[0]) / (b[1] - a[1])


def pick_threads(set_torch: bool = True, max_threads: int | None = None) -> int:
    """Intra-op threads for a run on a shared machine: one per core that other programs leave idle.

    torch uses one thread per core, and each operator waits for its slowest thread. When other
    programs keep cores busy, that thread waits for the scheduler, and a small network pays the
    wait on every operator: a step can cost many times more, not twice
    (``benchmarks/threads_under_load.py``). Fewer threads than busy cores degrade gracefully.
    The notebooks call this in their setup cell; it measures once, at that moment.

    Args:
        set_torch: also call ``torch.set_num_threads`` with the choice.
        max_threads: upper bound (default: the cores this process may use).

    Returns:
        The number of threads, at least 1.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    limit = min(cores, max_threads or cores)
    idle = _idle_cores()
    if idle is None:
        idle = max(0.0, cores - os.getloadavg()[0]) if hasattr(os, "getloadavg") else cores
    n = max(1, min(limit, int(idle + 0.5)))
    if set_torch:
        torch.set_num_threads(n)
    return n


def class_table(classes: Sequence[str], rows: Sequence[tuple[str, Sequence[str], Sequence[str]]],
                tail: Sequence[str] = ("Mean",), max_columns: int = 10, corner: str = "") -> str:
    """A per-class Markdown table in the papers' layout (classes as columns), split into blocks.

    A table of 17 or 19 classes is wider than a notebook beside JupyterLab's file browser, so
    the classes are cut into blocks of at most ``max_columns``; each block repeats the row
    labels, and the ``tail`` columns (the mean, a paper column) close the last block.

    Args:
        classes: the class names (the column heads).
        rows: ``(label, per-class cells, tail cells)``, cells already formatted as text.
        tail: heads of the columns after the classes.
        max_columns: classes per block.
        corner: head of the label column.

    Returns:
        Markdown text: the blocks, separated by blank lines.
    """
    if max_columns < 1:
        raise ValueError(f"max_columns={max_columns}; expected at least 1.")
    for label, cells, extra in rows:
        if len(cells) != len(classes) or len(extra) != len(tail):
            raise ValueError(f"row {label!r} has {len(cells)} class cells and {len(extra)} tail "
                             f"cells; expected {len(classes)} and {len(tail)} ({list(tail)}).")
    starts = list(range(0, len(classes), max_columns)) or [0]
    blocks = []
    for k, a in enumerate(starts):
        last = k == len(starts) - 1
        heads = list(classes[a:a + max_columns]) + (list(tail) if last else [])
        lines = [f"| {corner} | " + " | ".join(heads) + " |", "|---" * (len(heads) + 1) + "|"]
        for label, cells, extra in rows:
            body = list(cells[a:a + max_columns]) + (list(extra) if last else [])
            lines.append(f"| {label} | " + " | ".join(body) + " |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _round(x: Any) -> Any:
    """Floats to 6 significant digits, NaN/inf to None (JSON has no NaN), recursively."""
    x = _plain(x)
    if isinstance(x, float):
        return float(f"{x:.6g}") if math.isfinite(x) else None
    if isinstance(x, list):
        return [_round(v) for v in x]
    if isinstance(x, Mapping):  # e.g. a list of table rows
        return {str(k): _round(v) for k, v in x.items()}
    return x


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            flat.update(_flatten(v, key + "."))
        else:
            flat[key] = _round(v)
    return flat


def _device_name() -> str:
    return f"cuda ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else "cpu"


def default_results_dir() -> Path:
    """Where results go: ``$MINIKD_RESULTS_DIR``, else ``results/`` at the top of a source checkout
    (so notebooks, which run inside ``notebooks/``, and scripts write to the same folder), else
    ``./results``."""
    if os.environ.get("MINIKD_RESULTS_DIR"):
        return Path(os.environ["MINIKD_RESULTS_DIR"])
    checkout = Path(__file__).resolve().parents[1]
    if (checkout / "pyproject.toml").is_file():
        return checkout / "results"
    return Path("results")


def save_results(name: str, results: Mapping[str, Any],
                 results_dir: str | os.PathLike | None = None,
                 *, device: str | None = None) -> Path:
    """Write ``results_dir/<name>.json``: a flat dict plus ``"mode"`` and ``"device"``, atomically.

    Nested dicts become dotted keys (``{"student": {"miou": x}}`` → ``"student.miou"``); tensors
    become numbers or lists; floats keep 6 significant digits; NaN and inf become ``null``.

    Args:
        name: file stem, e.g. "03_dudes".
        results: the numbers to keep.
        results_dir: directory (created if missing); default ``default_results_dir()``.
        device: override the recorded device (default: the CUDA device name or "cpu").

    Returns:
        The path written.

    References:
        Every notebook's last cell writes its table with it.
    """
    if not name or any(c in name for c in "/\\") or name.startswith("."):
        raise ValueError(f"name={name!r}; expected a plain file stem such as '03_dudes'.")
    flat = _flatten(results)
    for key in ("mode", "device"):
        if key in flat:
            raise ValueError(f"results already has a {key!r} entry; save_results adds it itself. "
                             "Rename yours.")
    try:
        from minikd.data import get_mode
    except ImportError:
        mode = os.environ.get("MINIKD_MODE", "quick")
    else:
        mode = get_mode()
    flat.update(mode=mode, device=device or _device_name())
    text = json.dumps(flat, indent=2, allow_nan=False) + "\n"
    path = Path(results_dir or default_results_dir()) / f"{name}.json"
    _atomic_write(path, lambda f: f.write(text.encode()))
    return path


# =========================================================================== the model zoo
def zoo_user_dir() -> Path:
    """Where ``load_or_train`` trains zoo models: ``$MINIKD_ZOO``, else ``~/.cache/minikd/zoo``."""
    return Path(os.environ.get("MINIKD_ZOO") or Path.home() / ".cache" / "minikd" / "zoo")


def _recipe_toycity(spec: Mapping[str, Any], size: Sequence[int], transform: Any = None) -> Any:
    from minikd.data import ToyCity

    return ToyCity(spec["n"], size=tuple(size), split=spec["split"], domain=spec["domain"],
                   seed=spec["seed"], cache=True, transform=transform)


#: Recipe losses: CE for segmenters; EMUFormer's Eq. 7 (CE + GNLL) for SegDepthFormer and its
#: sub-ensemble; Eq. 6 (GNLL) for a DepthFormer (notebook 04).
ZOO_LOSSES = ("cross_entropy", "seg_depth", "depth_gnll")


def _recipe_loss(name: str) -> Callable[..., Any]:
    from minikd.losses import DepthGNLLLoss, SegDepthLoss, cross_entropy

    if name not in ZOO_LOSSES:
        raise ValueError(f"zoo recipe loss {name!r} is not known; expected one of "
                         f"{list(ZOO_LOSSES)}.")
    if name == "seg_depth":
        return SegDepthLoss()
    if name == "depth_gnll":
        return DepthGNLLLoss()
    return lambda logits, batch: cross_entropy(logits, batch["mask"])


# How a recipe trains (``recipe["method"]["name"]``; default "source_only"). The UDA teachers of
# notebook 05 (``toycity-uda/*``) start from a source-only zoo entry (``recipe["init"]``) and
# adapt it to unlabelled target images (``recipe["target"]``) by one of these.
ZOO_METHODS = ("source_only", "domain_randomisation", "adabn", "entropy_min", "self_training",
               "class_mix")


def zoo_validation_spec(manifest: Mapping[str, Any], entry: Mapping[str, Any] | None = None
                        ) -> dict[str, Any]:
    """The validation set of an entry: the manifest's, updated by the entry's ``validation``
    (the UDA teachers are measured on target-domain images)."""
    return {**manifest["validation"], **((entry or {}).get("validation") or {})}


def zoo_validation_set(manifest: Mapping[str, Any], size: Sequence[int], n: int | None = None,
                       entry: Mapping[str, Any] | None = None) -> Any:
    """The zoo's fixed ToyCity validation set (its first ``n`` images; default all) of
    ``entry`` (default: the manifest's)."""
    spec = zoo_validation_spec(manifest, entry)
    spec["n"] = n or spec["n"]
    return _recipe_toycity(spec, size)


def _zoo_figures(model: nn.Module, manifest: Mapping[str, Any], size: Sequence[int],
                 entry: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Headline figures of a zoo model: mIoU, per-class IoU and pixel accuracy on the fixed
    validation set, and the mIoU on its first ``check_n`` images (what the tests recompute)."""
    from minikd.data import ToyCity

    val = zoo_validation_spec(manifest, entry)
    full = zoo_evaluate(model, DataLoader(zoo_validation_set(manifest, size, entry=entry),
                                          batch_size=16))
    check = zoo_evaluate(model, DataLoader(zoo_validation_set(manifest, size, val["check_n"],
                                                              entry), batch_size=16))
    out: dict[str, Any] = {}
    if "miou" in full:
        out.update(miou=round(full["miou"], 4), pixel_acc=round(full["pixel_acc"], 4),
                   iou={c: round(v, 4) for c, v in zip(ToyCity.CLASSES, full["iou"])},
                   check_miou=round(check["miou"], 6))
    if "depth_rmse" in full:  # the depth models of notebook 04 (metres)
        out.update(depth_rmse=round(full["depth_rmse"], 4),
                   depth_delta1=round(full["depth_delta1"], 4),
                   check_depth_rmse=round(check["depth_rmse"], 6))
    return out


def zoo_evaluate(model: nn.Module, loader: DataLoader) -> dict[str, Any]:
    """The zoo's figures of a model on ``loader``: mIoU etc. for a segmenter, depth RMSE and δ1
    for a depth model, both for a joint one (no uncertainty metrics; CPU)."""
    from minikd.data import ToyCity
    from minikd.models import DepthFormer

    seg = not isinstance(model, DepthFormer)  # every other zoo model segments
    res = evaluate(model, loader, ToyCity.NUM_CLASSES if seg else None, device="cpu",
                   with_uncertainty=False)
    return {k: v for k, v in res.items() if seg or not k.startswith(("miou", "iou", "pixel",
                                                                     "ece"))}


def _curve_point(model: nn.Module, loader: DataLoader) -> dict[str, float]:
    res = zoo_evaluate(model, loader)
    return {k: res[k] for k in ("miou", "depth_rmse") if k in res}


def _half_state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().cpu().half() if v.is_floating_point() else v.detach().cpu()
            for k, v in model.state_dict().items()}


def train_zoo_entry(name: str, work_dir: str | os.PathLike | None = None, *,
                    manifest_path: str | os.PathLike | None = None, progress: bool = True
                    ) -> tuple[nn.Module, dict[str, Any]]:
    """Train zoo entry ``name`` by its recorded recipe (resumable) and measure it.

    The run checkpoints into ``work_dir/<name>/`` (default ``zoo_user_dir()``), so a killed run
    continues where it stopped. The trained weights are rounded to float16 (what the zoo ships)
    before they are measured, so the figures are those of the shipped file.

    Args:
        name: a manifest entry, e.g. ``"toycity/M256"``.
        work_dir: folder for checkpoints and the float16 weights.
        manifest_path: another manifest (tests); default the package's.
        progress: tqdm bar.

    Returns:
        (model in eval mode with the float16-rounded weights, the entry's measured fields:
        ``weights`` (path of the float16 file), ``val``, ``curve``, ``trained``).

    References:
        Taught in notebooks/01_vanilla_kd_temperature.ipynb ("the teacher comes from the zoo").
    """
    from minikd import __version__
    from minikd.models import build_from_entry, zoo_entry, zoo_manifest

    manifest = zoo_manifest(manifest_path)
    entry = zoo_entry(name, manifest)
    r = entry["recipe"]
    method = dict(r.get("method") or {"name": "source_only"})
    if method["name"] not in ZOO_METHODS:
        raise ValueError(f"zoo entry {name!r}: method {method['name']!r} is not one of "
                         f"{list(ZOO_METHODS)}.")
    out = Path(work_dir or zoo_user_dir()) / name
    set_seed(r["seed"])  # the initial weights depend on the recipe's seed only
    model = build_from_entry(entry)
    if r.get("init"):  # start from another zoo entry's shipped weights
        from minikd.models import pretrained

        model.load_state_dict(pretrained(r["init"]).state_dict())
    t0 = time.perf_counter()
    if method["name"] == "adabn":
        _target_batch_norm(model, r)
        history: dict[str, Any] = {"val": [], "time_s": time.perf_counter() - t0}
    else:
        loader, loss_fn = _zoo_training_data(r, method, model)
        curve_set = zoo_validation_set(manifest, r["size"], r["curve_n"], entry)
        history = fit(model, loader, loss_fn, iterations=r["iterations"],
                      optimizer=r["optimizer"], lr=r["lr"], weight_decay=r["weight_decay"],
                      decoder_lr_mult=r["decoder_lr_mult"], poly_power=r["poly_power"],
                      device="cpu", ckpt_dir=out / "checkpoint", seed=r["seed"],
                      val_loader=DataLoader(curve_set, batch_size=16), val_every=r["val_every"],
                      val_fn=_curve_point,
                      progress=progress, desc=name)
        if method.get("target_bn"):  # trained with per-domain batch statistics: test with target's
            _target_batch_norm(model, r)
    half = _half_state(model)
    weights = out / Path(entry["file"]).name
    _atomic_write(weights, lambda f: torch.save(half, f))
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in half.items()})
    model.eval()
    fields = {"weights": str(weights), "val": _zoo_figures(model, manifest, r["size"], entry),
              "curve": [{"step": v["step"], **{k: round(v[k], 4) for k in ("miou", "depth_rmse")
                                              if k in v}} for v in history["val"]],
              "trained": {"time_s": round(history["time_s"] or time.perf_counter() - t0),
                          "machine": _machine(), "threads": torch.get_num_threads(),
                          "minikd": __version__, "torch": torch.__version__,
                          "date": time.strftime("%Y-%m-%d")}}
    return model, fields


def _target_batch_norm(model: nn.Module, r: Mapping[str, Any]) -> None:
    """AdaBN on the recipe's (un-augmented) target images: the BatchNorm statistics the model is
    tested with."""
    from minikd.adaptation import adabn

    adabn(model, DataLoader(_recipe_toycity(r["target"], r["size"]), batch_size=r["batch_size"]))


def _zoo_training_data(r: Mapping[str, Any], method: Mapping[str, Any], model: nn.Module
                       ) -> tuple[DataLoader, Callable[..., Any]]:
    """The loader and loss of a recipe: source images (labelled), and for the UDA methods the
    unlabelled target images joined to them (``adaptation.SourceTarget``)."""
    from minikd.data import Compose, Unlabelled, train_transforms

    geometric = train_transforms(r["size"], **r["augment"])
    source_tf = geometric
    if method["name"] == "domain_randomisation":
        from minikd.adaptation import strong_photometric

        source_tf = Compose([geometric, strong_photometric()])
    data = _recipe_toycity(r["data"], r["size"], source_tf)
    loss_fn = _recipe_loss(r["loss"])
    if method["name"] in ("entropy_min", "self_training", "class_mix"):
        from minikd import adaptation

        if method["name"] == "self_training":
            target = _pseudo_labelled_target(model, r, method.get("portion", 0.5), geometric)
        else:
            target = Unlabelled(_recipe_toycity(r["target"], r["size"], geometric))
        data = adaptation.SourceTarget(data, target)
        loss_fn = adaptation.UDALoss(model, method["name"], method.get("weight", 1.0))
    loader = DataLoader(data, batch_size=r["batch_size"], shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(r["seed"]))
    return loader, loss_fn


@torch.no_grad()
def _pseudo_labelled_target(model: nn.Module, r: Mapping[str, Any], portion: float,
                            transform: Any) -> Any:
    """CBST's one round: the starting model labels the un-augmented target images, class by
    class above its confidence threshold; the labels then move with the joint transform."""
    from minikd.adaptation import class_balanced_pseudo_labels
    from minikd.fusion import PseudoLabels

    plain = _recipe_toycity(r["target"], r["size"])
    model.eval()
    conf, pred = [], []
    for batch in DataLoader(plain, batch_size=32):
        c, p = model(batch["image"]).float().softmax(1).max(1)
        conf.append(c)
        pred.append(p)
    labels, _ = class_balanced_pseudo_labels(torch.cat(conf), torch.cat(pred), portion)
    model.train()
    return PseudoLabels(plain, labels, transform)


def _machine() -> str:
    import platform

    return f"{platform.machine()} CPU, {os.cpu_count()} cores ({platform.system()})"


def publish_zoo_entry(name: str, fields: Mapping[str, Any],
                      manifest_path: str | os.PathLike | None = None) -> None:
    """Copy a trained entry's float16 weights into the zoo folder and rewrite its manifest entry
    (figures, curve, time, sha256) atomically. Used by ``python -m minikd.training zoo``."""
    import shutil

    from minikd.models import ZOO_MANIFEST, _sha256, retrain_command, zoo_manifest

    manifest_path = Path(manifest_path or ZOO_MANIFEST)
    manifest = zoo_manifest(manifest_path)
    entry = manifest["entries"][name]
    target = manifest_path.parent / entry["file"]
    with open(fields["weights"], "rb") as src:
        _atomic_write(target, lambda f: shutil.copyfileobj(src, f))
    entry.update({k: v for k, v in fields.items() if k != "weights"})
    entry["sha256"] = _sha256(target)
    entry["command"] = retrain_command(name)
    text = json.dumps(manifest, indent=1, ensure_ascii=False) + "\n"
    _atomic_write(manifest_path, lambda f: f.write(text.encode()))


def load_or_train(name: str, retrain: bool = False, *,
                  work_dir: str | os.PathLike | None = None, progress: bool = False
                  ) -> nn.Module:
    """Load zoo model ``name`` (shipped weights), or train it here by its recipe and load that.

    "Load the checkpoint if present, else train": with ``retrain=False`` the shipped weights
    are loaded (``models.pretrained``); with ``retrain=True`` the recipe runs into
    ``work_dir/<name>`` (default ``$MINIKD_ZOO`` or ``~/.cache/minikd/zoo``), resuming from
    its checkpoint if one is there, and that model is returned. Either way it prints what it did.

    Args:
        name: a zoo entry, e.g. ``"toycity/M256"`` (``models.zoo_manifest()`` lists them).
        retrain: train by the recipe instead of loading the shipped weights.
        work_dir: where a retrained model lives.
        progress: tqdm bar while training.

    Returns:
        The model in eval mode, on the CPU.

    References:
        Taught in notebooks/01_vanilla_kd_temperature.ipynb.
    """
    from minikd.models import pretrained, zoo_entry

    entry = zoo_entry(name)
    if not retrain:
        model = pretrained(name)
        t = entry["trained"]
        print(f"loaded {name} from the zoo (trained {t['time_s'] / 60:.0f} min on {t['machine']}, "
              f"{t['threads']} threads; val mIoU {entry['val']['miou']:.3f}); pass retrain=True "
              "to train it here")
        return model
    model, fields = train_zoo_entry(name, work_dir, progress=progress)
    shipped = entry.get("val", {}).get("miou")
    print(f"trained {name} here by its recipe ({fields['trained']['time_s'] / 60:.1f} min; "
          f"val mIoU {fields['val']['miou']:.3f}"
          + (f", shipped {shipped:.3f}" if shipped is not None else "")
          + f"); weights in {fields['weights']}")
    return model


def zoo_main(argv: Sequence[str]) -> None:
    """``python -m minikd.training zoo --list | --train NAME | --train-all``."""
    from minikd.models import zoo_manifest

    p = argparse.ArgumentParser(prog="python -m minikd.training zoo",
                                description="List or retrain the ToyCity model zoo.")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--list", action="store_true", help="list the entries and their figures")
    g.add_argument("--train", metavar="NAME", help="retrain one entry and rewrite the manifest")
    g.add_argument("--train-all", action="store_true", help="retrain every entry")
    p.add_argument("--work-dir", default=None, help="checkpoints (default $MINIKD_ZOO)")
    args = p.parse_args(argv)
    entries = zoo_manifest()["entries"]
    if args.list:
        for name, e in entries.items():
            val = e.get("val", {}).get("miou")
            t = e.get("trained", {}).get("time_s")
            print(f"{name:24s} {e['builder']}({e['args']}) val mIoU "
                  f"{val if val is None else f'{val:.3f}'}, trained "
                  f"{t if t is None else f'{t / 60:.0f} min'}")
        return
    for name in list(entries) if args.train_all else [args.train]:
        _, fields = train_zoo_entry(name, args.work_dir)
        publish_zoo_entry(name, fields)
        figs = ", ".join(f"{label} {fields['val'][k]:.3f}" for k, label in
                         (("miou", "mIoU"), ("depth_rmse", "depth RMSE")) if k in fields["val"])
        print(f"{name}: val {figs}; manifest updated")


# =========================================================================== torchrun demo
def main(argv: Sequence[str] | None = None) -> None:
    """Demo: an M128/4 U-Net ensemble on ToyCity, members spread over the ranks of torchrun.

    ``torchrun --standalone --nproc_per_node=2 -m minikd.training --members 4`` (or plain
    ``python -m minikd.training`` on one process). ``python -m minikd.training zoo ...`` lists
    and retrains the model zoo (``zoo_main``).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["zoo"]:
        zoo_main(argv[1:])
        return
    from minikd.data import ToyCity, eval_transforms, train_transforms
    from minikd.models import unet_family

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--members", type=int, default=4)
    p.add_argument("--iterations", type=int, default=50)
    p.add_argument("--ckpt-dir", default=None)
    args = p.parse_args(argv)
    init_distributed()
    size = (64, 128)
    train = DataLoader(ToyCity(32, size, transform=train_transforms(size)), batch_size=4,
                       shuffle=True)
    members = train_ensemble(
        lambda: unet_family("M128/4", ToyCity.NUM_CLASSES), args.members, train,
        lambda out, b: F.cross_entropy(out, b["mask"], ignore_index=255),
        iterations=args.iterations, ckpt_dir=args.ckpt_dir, progress=is_main_process())
    if is_main_process():
        from minikd.ensembles import DeepEnsemble

        val = DataLoader(ToyCity(8, size, split="val", transform=eval_transforms()), batch_size=4)
        res = evaluate(DeepEnsemble(members), val, ToyCity.NUM_CLASSES)
        print(f"{len(members)} members, world size {_rank_world()[1]}: ensemble mIoU "
              f"{res['miou']:.3f}, error AUROC {res['error_auroc']:.3f}")
    if _dist_on():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
