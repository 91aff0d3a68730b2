"""Pieces every benchmark script shares: the models it times and an interleaved timer.

Run the scripts as ``python benchmarks/<name>.py``; Python then finds this module next to them.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from minikd.models import UNet, build_segmenter, unet_family


def make_segmenter(arch: str, num_classes: int) -> torch.nn.Module:
    """The plain segmenter of a benchmark: "unet-tiny" or DeepLabV3+ ResNet18 (random weights:
    timing does not need training)."""
    if arch == "unet-tiny":
        return unet_family("M128/4", num_classes=num_classes)
    return build_segmenter("DeepLabV3Plus", "resnet18", num_classes=num_classes)


def small_model(name: str, num_classes: int) -> tuple[torch.nn.Module, str]:
    """A U-Net name ("M128/4", "M128", ...) or "depth,bridge" such as "4,64" for UNet(4, 64),
    with a one-line description."""
    if "," in name:
        depth, bridge = (int(v) for v in name.split(","))
        net, desc = UNet(depth, bridge, num_classes=num_classes), f"UNet({depth}, {bridge})"
    else:
        net, desc = unet_family(name, num_classes), f"unet_family({name!r})"
    n = sum(p.numel() for p in net.parameters())
    return net, f"minikd.models.{desc}, {n / 1e3:.0f}k parameters"


def ce_step(model: torch.nn.Module, opt: torch.optim.Optimizer, batch: dict) -> None:
    """One training step as the ToyCity benchmarks time it: cross-entropy (void = 255) on
    batch["image"] / batch["mask"], backward, optimiser update."""
    loss = F.cross_entropy(model(batch["image"]), batch["mask"], ignore_index=255)
    opt.zero_grad()
    loss.backward()
    opt.step()


def add_timing_args(parser: argparse.ArgumentParser, warmup: int, repeats: int) -> None:
    """--warmup, --repeats and --threads, as every timing script takes them."""
    parser.add_argument("--warmup", type=int, default=warmup)
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--threads", type=int, default=None)


def setup_run(args: argparse.Namespace) -> torch.device:
    """Apply --threads, seed torch, and return CUDA if available, else the CPU."""
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_ms(fns: dict[str, Callable[[], object]], device: torch.device, warmup: int,
                   repeats: int) -> dict[str, list[float]]:
    """Per-call wall times in ms, one call of every function per round, so that load changes on
    a shared machine hit every variant alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append((time.perf_counter() - t0) * 1e3)
    return times
