"""How fast ToyCity renders, next to what one training step of a small network costs per sample.

The generator must never be what training waits for: issue 2 asks for generation at least 10x
faster than a training step of a small model, per sample. The small model is the U-Net KD paper's
smallest U-Net, M128 (483k parameters): the network notebook 00 and
benchmarks/toycity_difficulty.py train to measure how hard ToyCity is, and the smallest student of
notebook 02. The even smaller UNet(4, 64) (122k parameters, 4 filters at full resolution) of
notebooks 01 and 03 is timed too, for comparison. Generation (fresh items, both domains), reading
items back from the in-memory cache (`ToyCity(..., cache=True)`) and the training steps are timed
in alternating rounds (so that a busy, shared machine slows all of them alike) and the medians
are compared. Each is timed twice: wall clock and CPU time of this process (the second is less
disturbed when other programs share the CPU).

Usage:
    python benchmarks/toycity_speed.py                  # M128 and UNet(4, 64), 64x128 and 128x256
    python benchmarks/toycity_speed.py --model M128/4 --rounds 5

Prints samples/s of generation (source and target domain) and of cached reads, each training
step's ms per sample (batch 16, SGD, cross-entropy, forward + backward + update) and the ratios
step / generation and step / cached read.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _common import ce_step, small_model

from minikd.data import ToyCity


def timed(count: int, fn, *args) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) per unit of fn(*args), which does `count`
    units."""
    w0, c0 = time.perf_counter(), time.process_time()
    fn(*args)
    return (time.perf_counter() - w0) / count, (time.process_time() - c0) / count


def read_items(ds: ToyCity, start: int, count: int) -> None:
    for i in range(start, start + count):
        ds[i]


def train_steps(model, opt, batch: dict, steps: int) -> None:
    """Forward + backward + SGD update on one batch, `steps` times."""
    for _ in range(steps):
        ce_step(model, opt, batch)


def bench(size: tuple[int, int], model_names: list[str], rounds: int, per_round: int,
          batch_size: int) -> dict:
    """Alternate generation, cached reads and training rounds at one image size; return the
    median ms per sample of each, as {name: (wall_ms, cpu_ms)} (training steps under
    "step <model name>"), plus "models": {name: description}."""
    nets = [small_model(name, ToyCity.NUM_CLASSES) for name in model_names]
    opts = [torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9) for net, _ in nets]
    data = {d: ToyCity(10_000, size=size, domain=d) for d in ("source", "target")}
    cached = ToyCity(per_round, size=size, cache=True)
    read_items(cached, 0, per_round)  # fill the cache
    batch = torch.utils.data.default_collate([data["source"][i] for i in range(batch_size)])
    for (net, _), opt in zip(nets, opts):
        train_steps(net, opt, batch, 2)  # warm-up
    times: dict[str, list] = {"gen_source": [], "gen_target": [], "cached": []}
    times.update({f"step {name}": [] for name in model_names})
    for r in range(rounds):
        for d, ds in data.items():
            start = 1000 + r * per_round
            times[f"gen_{d}"].append(timed(per_round, read_items, ds, start, per_round))
        times["cached"].append(timed(per_round, read_items, cached, 0, per_round))
        for name, (net, _), opt in zip(model_names, nets, opts):
            times[f"step {name}"].append(timed(3 * batch_size, train_steps, net, opt, batch, 3))
    out = {k: tuple(1e3 * statistics.median(t[j] for t in v) for j in (0, 1))
           for k, v in times.items()}
    out["models"] = {name: desc for name, (_, desc) in zip(model_names, nets)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", default=None,
                        help='U-Net name ("M128/4", "M128") or "depth,bridge"; repeat for several '
                             '(default: M128 and 4,64)')
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--per-round", type=int, default=16, help="samples rendered per round")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a shared 2-core CPU, 2 threads were 30x slower)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; generation is "
          "single-threaded numpy; ms/sample as wall clock | CPU time of this process")
    models = args.model or ["M128", "4,64"]
    for size in ((64, 128), (128, 256)):
        r = bench(size, models, args.rounds, args.per_round, args.batch)
        print(f"\n{size[0]}x{size[1]}  training steps with batch {args.batch}")
        for name, desc in r["models"].items():
            print(f"  model {name}: {desc}")
        steps = [f"step {name}" for name in r["models"]]
        rows = [("generation (source)", "gen_source"), ("generation (target)", "gen_target"),
                ("cached read (cache=True)", "cached")] + [(k, k) for k in steps]
        for label, key in rows:
            wall, cpu = r[key]
            print(f"  {label:25s}: {wall:8.3f} | {cpu:8.3f} ms/sample = {1e3 / wall:8.1f} | "
                  f"{1e3 / cpu:8.1f} samples/s")
        for step in steps:
            print(f"  {step}:")
            for label, keys in (("step / generation", ("gen_source", "gen_target")),
                                ("step / cached read", ("cached",))):
                ratios = [r[step][j] / max(r[k][j] for k in keys) for j in (0, 1)]
                verdict = "OK" if min(ratios) >= 10 else "below the 10x goal"
                print(f"    ratio {label:19s}: {ratios[0]:7.1f}x wall | {ratios[1]:7.1f}x CPU  "
                      f"({verdict})")

if __name__ == "__main__":
    main()
