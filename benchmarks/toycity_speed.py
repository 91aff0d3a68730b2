"""How fast ToyCity renders, next to what one training step of a small network costs per sample.

The generator must never be what training waits for: issue 2 asks for generation at least 10x
faster than a training step of a small model, per sample. Both are timed in alternating rounds
(so that a busy, shared machine slows both alike) and the medians are compared.

Usage:
    python benchmarks/toycity_speed.py                 # small U-Net(4, 64), 64x128 and 128x256
    python benchmarks/toycity_speed.py --model tiny --rounds 5

Prints samples/s of generation (source and target domain), the training step's ms per sample
(batch 16, SGD, cross-entropy, forward + backward + update) and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from minikd.data import ToyCity


def small_model(name: str, num_classes: int) -> tuple[torch.nn.Module, str]:
    """A U-Net from minikd.models: a preset name ("tiny", "M128", ...) or "depth,bridge" such as
    "4,64" for UNet(4, 64). Falls back to a small local conv net (and says so)."""
    try:
        from minikd.models import UNet, unet_family

        if "," in name:
            depth, bridge = (int(v) for v in name.split(","))
            net, desc = UNet(depth, bridge, num_classes=num_classes), f"UNet({depth}, {bridge})"
        else:
            net, desc = unet_family(name, num_classes), f"unet_family({name!r})"
        n = sum(p.numel() for p in net.parameters())
        return net, f"minikd.models.{desc}, {n / 1e3:.0f}k parameters"
    except (ImportError, AttributeError, ValueError):
        net = torch.nn.Sequential(
            torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
            torch.nn.Conv2d(16, 32, 3, padding=2, dilation=2), torch.nn.BatchNorm2d(32),
            torch.nn.ReLU(), torch.nn.Conv2d(32, num_classes, 1))
        return net, "local 3-layer conv net (minikd.models not available)"


def time_generation(ds: ToyCity, start: int, count: int) -> float:
    """Seconds per sample to render `count` fresh items (no cache)."""
    t0 = time.perf_counter()
    for i in range(start, start + count):
        ds[i]
    return (time.perf_counter() - t0) / count


def time_train_step(model, opt, batch: dict, steps: int) -> float:
    """Seconds per sample of forward + backward + SGD update on one batch."""
    x, y = batch["image"], batch["mask"]
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y, ignore_index=255)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return (time.perf_counter() - t0) / (steps * len(x))


def bench(size: tuple[int, int], model_name: str, rounds: int, per_round: int,
          batch_size: int) -> dict:
    """Alternate generation and training rounds at one image size; return median timings."""
    model, desc = small_model(model_name, ToyCity.NUM_CLASSES)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    data = {d: ToyCity(10_000, size=size, domain=d) for d in ("source", "target")}
    batch = torch.utils.data.default_collate([data["source"][i] for i in range(batch_size)])
    time_train_step(model, opt, batch, 2)  # warm-up
    gen = {d: [] for d in data}
    step = []
    for r in range(rounds):
        for d, ds in data.items():
            gen[d].append(time_generation(ds, 1000 + r * per_round, per_round))
        step.append(time_train_step(model, opt, batch, 3))
    out = {f"gen_{d}_ms": 1e3 * statistics.median(v) for d, v in gen.items()}
    out["step_ms"] = 1e3 * statistics.median(step)
    out["model"] = desc
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="4,64",
                        help='U-Net preset ("tiny", "M128") or "depth,bridge" (default 4,64)')
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--per-round", type=int, default=16, help="samples rendered per round")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a shared 2-core CPU, 2 threads were 30x slower)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; generation is "
          "single-threaded numpy")
    for size in ((64, 128), (128, 256)):
        r = bench(size, args.model, args.rounds, args.per_round, args.batch)
        slowest = max(r["gen_source_ms"], r["gen_target_ms"])
        print(f"\n{size[0]}x{size[1]}  model: {r['model']}, batch {args.batch}")
        for d in ("source", "target"):
            ms = r[f"gen_{d}_ms"]
            print(f"  generation ({d}): {ms:6.2f} ms/sample = {1e3 / ms:6.1f} samples/s")
        print(f"  training step   : {r['step_ms']:6.2f} ms/sample = {1e3 / r['step_ms']:6.1f} "
              "samples/s")
        ratio = r["step_ms"] / slowest
        verdict = "OK" if ratio >= 10 else "below the 10x goal"
        print(f"  ratio step / generation: {ratio:.1f}x  ({verdict})")


if __name__ == "__main__":
    main()
