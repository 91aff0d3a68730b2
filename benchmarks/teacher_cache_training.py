"""Benchmark 2: DUDES student training time per step — teacher cache vs recomputing the deep
ensemble every step vs the plain segmenter (cross-entropy only).

Every variant does the same work per step apart from the teacher: fetch a batch of augmented
ToyCity crops from a DataLoader (num_workers=0, so loading is inside the timed step), forward,
loss, backward, SGD step.

- plain: the segmenter with cross-entropy (the baseline's training step);
- cached: the DUDES student with CE + RMSLE, ``teacher_unc`` read from a ``TeacherCache`` and
  carried through the joint transform by ``CachedTargets`` (goal: within 1.15x of plain);
- recompute: the DUDES student, the N-member ensemble run on each augmented batch (what the
  DUDES code does).

The cache's one-off build time (one teacher pass per training image) is reported separately,
with the number of steps after which it has paid for itself.

    python benchmarks/teacher_cache_training.py                                 # DeepLabV3+ R18
    python benchmarks/teacher_cache_training.py --arch unet-tiny --members 10
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from _common import add_timing_args, interleaved_ms, make_segmenter, setup_run

from minikd.data import ToyCity, eval_transforms, train_transforms
from minikd.ensembles import CachedTargets, DeepEnsemble, TeacherCache
from minikd.losses import dudes_loss
from minikd.models import DUDESStudent


class Transformed(torch.utils.data.Dataset):
    """``base`` with a transform, sharing its rendered samples (so no variant pays rendering)."""

    def __init__(self, base, transform):
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict:
        return self.transform(self.base[i])


def batches(dataset, batch_size: int) -> Iterator[dict]:
    """An endless stream of shuffled batches."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True,
                                         drop_last=True, num_workers=0)
    return itertools.chain.from_iterable(itertools.repeat(loader))


def step_fns(args, device) -> tuple[dict[str, Callable[[], None]], float]:
    """The three training-step closures and the cache build time in seconds."""
    n_cls = ToyCity.NUM_CLASSES
    size, crop = tuple(args.size), tuple(args.crop)
    base = ToyCity(args.images, size=size, seed=0, cache=True)  # un-augmented, rendered once
    augmented = Transformed(base, train_transforms(crop))
    teacher = DeepEnsemble([make_segmenter(args.arch, n_cls).to(device).eval()
                            for _ in range(args.members)])
    t0 = time.perf_counter()
    cache = TeacherCache(teacher, base, targets=("uncertainty",), device=device,
                         batch_size=args.batch, preprocess=eval_transforms())
    build_s = time.perf_counter() - t0
    cached = CachedTargets(base, cache, transform=train_transforms(crop))

    plain = make_segmenter(args.arch, n_cls).to(device).train()
    student = DUDESStudent(make_segmenter(args.arch, n_cls)).to(device).train()
    opts = {k: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
            for k, m in (("plain", plain), ("student", student))}
    streams = {"plain": batches(augmented, args.batch), "cached": batches(cached, args.batch),
               "recompute": batches(augmented, args.batch)}

    def plain_step() -> None:
        b = next(streams["plain"])
        opts["plain"].zero_grad()
        F.cross_entropy(plain(b["image"].to(device)), b["mask"].to(device),
                        ignore_index=255).backward()
        opts["plain"].step()

    def student_step(b: dict, teacher_unc: torch.Tensor) -> None:
        opts["student"].zero_grad()
        out = student(b["image"].to(device))
        loss, _ = dudes_loss(out["logits"], out["uncertainty"], b["mask"].to(device),
                             teacher_unc.to(device).float())
        loss.backward()
        opts["student"].step()

    def cached_step() -> None:
        b = next(streams["cached"])
        student_step(b, b["teacher_unc"])

    def recompute_step() -> None:
        b = next(streams["recompute"])
        student_step(b, teacher.predict(b["image"].to(device))["uncertainty"])

    return {"plain": plain_step, "cached": cached_step, "recompute": recompute_step}, build_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=["deeplabv3plus-resnet18", "unet-tiny"],
                        default="deeplabv3plus-resnet18")
    parser.add_argument("--members", type=int, default=10, help="N (DUDES: 10)")
    parser.add_argument("--images", type=int, default=32, help="ToyCity training images")
    parser.add_argument("--size", type=int, nargs=2, default=[128, 256], help="image H W")
    parser.add_argument("--crop", type=int, nargs=2, default=[128, 128], help="crop H W")
    parser.add_argument("--batch", type=int, default=4)
    add_timing_args(parser, warmup=2, repeats=15)
    args = parser.parse_args()
    device = setup_run(args)
    fns, build_s = step_fns(args, device)
    times = interleaved_ms(fns, device, args.warmup, args.repeats)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"device={device} threads={torch.get_num_threads()} arch={args.arch} "
          f"N={args.members} images={args.images}@{args.size[0]}x{args.size[1]} "
          f"crop={args.crop[0]}x{args.crop[1]} batch={args.batch} repeats={args.repeats}")
    for k, v in med.items():
        print(f"  {k:10s} median {v:9.1f} ms/step")
    print(f"cached / plain     = {med['cached'] / med['plain']:.3f}  (goal <= 1.15)")
    print(f"recompute / plain  = {med['recompute'] / med['plain']:.2f}")
    print(f"recompute / cached = {med['recompute'] / med['cached']:.2f}  (time saved per step)")
    saved = (med["recompute"] - med["cached"]) / 1e3
    print(f"cache build: {build_s:.1f} s for {args.images} images, paid back after "
          f"{build_s / max(saved, 1e-9):.0f} steps")


if __name__ == "__main__":
    main()
