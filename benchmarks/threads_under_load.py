"""How a training step slows down when other programs keep the cores busy, by thread count.

A learner's laptop is rarely idle. On a 2-core machine, torch's default of one intra-op thread per
core makes every operator wait for its slowest thread; when another program holds a core, that
thread waits for the scheduler, and small operators (a U-Net at 64x128) pay that wait thousands
of times per second. This script times the same training steps (M128, the difficulty probe of
notebook 00) quiet and under a deliberate background load (``--load`` busy processes), with
torch's default thread count and with ``training.pick_threads()``'s choice, and prints the
slowdown each suffers, measured within one run.

    python benchmarks/threads_under_load.py            # about 1 minute on 2 cores
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import time

import torch
from _common import ce_step, small_model

from minikd import data, training


def _burn(stop) -> None:
    """A busy process: pure Python arithmetic until told to stop (what 'another program' does)."""
    x = 0
    while not stop.is_set():
        x = (x * 31 + 7) % 1000003


def steps_per_s(threads: int, steps: int, batch: dict) -> float:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model, _ = small_model("M128", data.ToyCity.NUM_CLASSES)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ce_step(model, opt, batch)  # warm-up
    t0 = time.perf_counter()
    for _ in range(steps):
        ce_step(model, opt, batch)
    return steps / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--load", type=int, default=os.cpu_count() or 2,
                        help="busy background processes (default: one per core)")
    args = parser.parse_args()
    ds = data.ToyCity(8, size=(64, 128), seed=0)
    batch = torch.utils.data.default_collate([ds[i] for i in range(8)])
    default = torch.get_num_threads()
    results = {}
    for load in (0, args.load):
        stop = mp.Event()
        burners = [mp.Process(target=_burn, args=(stop,), daemon=True) for _ in range(load)]
        for p in burners:
            p.start()
        time.sleep(1.0 if load else 0.0)  # let the load average see them
        chosen = training.pick_threads(set_torch=False)
        for threads in sorted({default, chosen, 1}):
            results[load, threads] = steps_per_s(threads, args.steps, batch)
        results[load, "chosen"] = chosen
        stop.set()
        for p in burners:
            p.join()
    print(f"M128 training steps at 64x128, batch 8, {os.cpu_count()} CPUs, "
          f"background load: {args.load} busy processes")
    print(f"{'threads':>8s} {'quiet steps/s':>14s} {'loaded steps/s':>15s} {'slowdown':>9s}")
    for threads in sorted({k[1] for k in results if isinstance(k[1], int)}):
        quiet, loaded = results[0, threads], results[args.load, threads]
        print(f"{threads:8d} {quiet:14.2f} {loaded:15.2f} {quiet / loaded:8.1f}x")
    print(f"torch's default: {default} threads; pick_threads() chose {results[0, 'chosen']} quiet "
          f"and {results[args.load, 'chosen']} under load")
    best_loaded = max(results[args.load, t] for t in (default, 1))
    print(f"under load, {results[args.load, 'chosen']} thread(s) run "
          f"{results[args.load, results[args.load, 'chosen']] / results[args.load, default]:.1f}x "
          f"as fast as the default (best: {best_loaded / results[args.load, default]:.1f}x)")


if __name__ == "__main__":
    main()
