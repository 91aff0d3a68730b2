"""Does training wait for ToyCity? The same training loop fed three ways, timed per iteration.

benchmarks/toycity_speed.py compares generation with a training step per sample on one core.
This script measures what a user sees: M128 (the U-Net KD paper's smallest U-Net) trained for
a few iterations on batches that come

1. from tensors already in memory (the floor: the step alone),
2. from a fresh `ToyCity` through a `DataLoader` with `num_workers=0` (rendering in the loop),
3. from a fresh `ToyCity` through a `DataLoader` with `num_workers=1` (rendering in a background
   process while the step runs; on a 2-core machine the step keeps one core),
4. from `ToyCity(..., cache=True)` after one pass (what the notebooks do).

Each variant runs in alternating rounds (a busy machine slows all alike); the script prints the
median seconds per iteration and the ratio to variant 1. A ratio of about 1.0 means training
never waits for data.

Usage:
    python benchmarks/toycity_loader_overlap.py                    # 64x128, batch 16
    python benchmarks/toycity_loader_overlap.py --size 128x256 --model 4,64
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import torch
from _common import ce_step, small_model

from minikd.data import ToyCity


def run(model, opt, batches, iters: int) -> float:
    """Seconds per iteration over `iters` iterations, data fetching included."""
    it = iter(batches)
    t0 = time.perf_counter()
    for _ in range(iters):
        ce_step(model, opt, next(it))
    return (time.perf_counter() - t0) / iters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="M128", help='U-Net preset or "depth,bridge"')
    parser.add_argument("--size", default="64x128")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--iters", type=int, default=8, help="iterations per round and variant")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of the training step (1 leaves a core to a worker)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    size = tuple(int(s) for s in args.size.split("x"))
    model, desc = small_model(args.model, ToyCity.NUM_CLASSES)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    n = args.batch * args.iters * args.rounds * 2  # fresh items for every round of every variant
    memory = torch.utils.data.default_collate([ToyCity(args.batch, size, seed=7)[i]
                                               for i in range(args.batch)])
    cached = ToyCity(args.batch * args.iters, size, seed=8, cache=True)
    for i in range(len(cached)):
        cached[i]  # first pass: render and keep
    fresh = {w: ToyCity(n, size, seed=w + 1) for w in (0, 1)}
    loaders = {w: torch.utils.data.DataLoader(fresh[w], batch_size=args.batch, num_workers=w,
                                              persistent_workers=w > 0)
               for w in (0, 1)}
    iterators = {w: iter(loaders[w]) for w in (0, 1)}
    variants = {
        "in-memory tensors (step alone)": lambda: itertools.repeat(memory),
        "fresh ToyCity, num_workers=0": lambda: iterators[0],
        "fresh ToyCity, num_workers=1": lambda: iterators[1],
        "ToyCity(cache=True), 2nd pass": lambda: iter(torch.utils.data.DataLoader(
            cached, batch_size=args.batch, shuffle=True)),
    }
    run(model, opt, itertools.repeat(memory), 2)  # warm-up
    next(iterators[1])  # start the worker
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.rounds):
        for name, batches in variants.items():
            times[name].append(run(model, opt, batches(), args.iters))
    print(f"{desc}, {size[0]}x{size[1]}, batch {args.batch}, {torch.get_num_threads()} torch "
          f"thread(s), {args.rounds} rounds x {args.iters} iterations; median s/iteration:")
    base = statistics.median(times["in-memory tensors (step alone)"])
    for name, t in times.items():
        med = statistics.median(t)
        print(f"  {name:32s} {med:7.3f} s  = {med / base:5.2f}x the step alone")


if __name__ == "__main__":
    main()
