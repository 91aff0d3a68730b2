"""Benchmark 7 (issue 16): ensemble inference and evaluation that pay for the members once.

Four figures, each a ratio measured within one run (variants interleaved, medians):

    predict   DeepEnsemble.predict / (N x one member forward)     goal <= 1.15 (M128), <= 1.5 (M128/4)
    memory    peak memory of predict, N = 10 / N = 2               goal <= 1.5
    meter     SegmentationMeter update+compute / torchmetrics      goal <= 0.5
    evaluate  training.evaluate (every uncertainty metric) / forward-only pass, M128 DUDES student
                                                                   goal <= 1.4

Each also times the implementation this issue replaced (kept verbatim below as the "before"
variant), so one run gives the before/after table of benchmarks/RESULTS.md.

    OMP_NUM_THREADS=1 python benchmarks/ensemble_streaming.py predict --model M128 --threads 1
    OMP_NUM_THREADS=1 python benchmarks/ensemble_streaming.py predict --model M128/4 --threads 1
    OMP_NUM_THREADS=1 python benchmarks/ensemble_streaming.py memory
    OMP_NUM_THREADS=1 python benchmarks/ensemble_streaming.py meter --threads 1
    OMP_NUM_THREADS=1 python benchmarks/ensemble_streaming.py evaluate --threads 1

On CUDA (when a GPU is there) the same commands time the GPU; ``memory`` then reads
``torch.cuda.max_memory_allocated`` instead of the process's resident set.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys

import torch
from _common import add_timing_args, interleaved_ms, setup_run
from torch.utils.data import DataLoader

from minikd import metrics
from minikd.ensembles import DeepEnsemble
from minikd.models import DUDESStudent, unet_family
from minikd.training import evaluate


def stacked_statistics_before(member_outputs: dict, correction: int = 1) -> dict:
    """What ``DeepEnsemble.predict`` computed before issue 16: every statistic over the stacked
    [N, B, C, H, W] softmax (verbatim, with ``dudes_uncertainty`` inlined)."""
    member_probs = member_outputs["logits"].float().softmax(dim=2)
    probs = member_probs.mean(0)
    entropy = torch.special.entr(probs).sum(1)
    expected_entropy = torch.special.entr(member_probs).sum(2).mean(0)
    pred = probs.argmax(1)
    m = member_probs.shape[0]
    index = pred[None, :, None].expand(m, -1, 1, -1, -1)
    p_pred = member_probs.gather(2, index).squeeze(2)
    unc = p_pred.std(dim=0, correction=correction)
    return {"probs": probs, "pred": pred, "uncertainty": unc, "entropy": entropy,
            "mutual_info": (entropy - expected_entropy).clamp_min(0)}


def _members(name: str, n: int, classes: int, device: torch.device) -> list[torch.nn.Module]:
    return [unet_family(name, classes).to(device).eval() for _ in range(n)]


def bench_predict(args: argparse.Namespace, device: torch.device) -> None:
    members = _members(args.model, args.members, args.classes, device)
    ens = DeepEnsemble(members, vectorize=False)
    x = torch.rand(args.batch, 3, *args.size, device=device)

    def forwards() -> None:
        for m in members:
            m(x)

    fns = {"N forwards": forwards,
           "predict (streamed, all statistics)": lambda: ens.predict(x),
           "predict(statistics=('uncertainty',))": lambda: ens.predict(x, statistics="uncertainty"),
           "before: stacked statistics": lambda: stacked_statistics_before(
               {"logits": torch.stack([m(x) for m in members])})}
    with torch.inference_mode():
        times = interleaved_ms(fns, device, args.warmup, args.repeats)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"device={device} threads={torch.get_num_threads()} members={args.members} x "
          f"unet_family({args.model!r}) input={args.batch}x3x{args.size[0]}x{args.size[1]} "
          f"classes={args.classes} repeats={args.repeats}")
    base = med["N forwards"]
    for k, v in med.items():
        print(f"  {k:40s} {v:9.1f} ms   / N forwards = {v / base:.3f}")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _memory_child(args: argparse.Namespace, device: torch.device) -> None:
    """One measurement in a fresh process: the peak above the resident set before the call."""
    members = _members(args.model, args.members, args.classes, device)
    ens = DeepEnsemble(members, vectorize=False)
    x = torch.rand(args.batch, 3, *args.size, device=device)
    call = {"forward": lambda: members[0](x), "predict": lambda: ens.predict(x),
            "before": lambda: stacked_statistics_before(ens.forward_members(x))}[args.variant]
    with torch.inference_mode():
        if device.type == "cuda":
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            call()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
        else:
            base = _rss_bytes()
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            call()
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - max(base, before)
    print(json.dumps({"peak_mib": peak / 2**20}))


def bench_memory(args: argparse.Namespace, device: torch.device) -> None:
    # A fixed mmap threshold makes glibc return every large tensor to the system when it is
    # freed, so the resident set's high-water mark is the peak of live tensors.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    rows = []
    for variant, n in (("forward", 1), ("predict", 2), ("predict", 10), ("before", 2),
                       ("before", 10)):
        cmd = [sys.executable, __file__, "memory-child", "--variant", variant, "--members",
               str(n), "--model", args.model, "--size", *map(str, args.size), "--classes",
               str(args.classes), "--batch", str(args.batch)]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        rows.append((variant, n, json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]))
    print(f"device={device} unet_family({args.model!r}) input={args.batch}x3x{args.size[0]}x"
          f"{args.size[1]} classes={args.classes}; peak above the memory before the call")
    peaks = {(v, n): p for v, n, p in rows}
    for v, n, p in rows:
        print(f"  {v:8s} N={n:2d}  {p:8.1f} MiB")
    print(f"  streamed predict N=10 / N=2 = {peaks['predict', 10] / peaks['predict', 2]:.2f} "
          f"(goal <= 1.5); before: {peaks['before', 10] / peaks['before', 2]:.2f}")
    print(f"  streamed predict N=10 / one forward = {peaks['predict', 10] / peaks['forward', 1]:.2f}"
          f"; before: {peaks['before', 10] / peaks['forward', 1]:.2f}")


def bench_meter(args: argparse.Namespace, device: torch.device) -> None:
    from torchmetrics.classification import MulticlassJaccardIndex

    g = torch.Generator().manual_seed(0)
    b, c = 4, args.classes
    probs = torch.rand(b, c, *args.size, generator=g).softmax(1).to(device)
    labels = torch.randint(0, c, (b, *args.size), generator=g).to(device)
    labels[:, :8] = 255
    tm = MulticlassJaccardIndex(num_classes=c, ignore_index=255, average="macro").to(device)
    meter = metrics.SegmentationMeter(c)

    def ours() -> None:
        meter.reset()
        meter.update(probs, labels)
        meter.compute()

    def ours_before() -> None:  # SegmentationMeter.update before issue 16, verbatim
        meter.reset()
        pred = probs.argmax(1)
        metrics.check_labels(labels, c, 255)
        metrics.check_labels(pred, c, None, name="pred")
        valid = labels != 255
        idx = labels[valid].reshape(-1).long() * c + pred[valid].reshape(-1).long()
        meter.confusion += torch.bincount(idx, minlength=c**2).reshape(c, c).cpu()
        meter.compute()

    def theirs() -> None:
        tm.reset()
        tm.update(probs, labels)
        tm.compute()

    with torch.inference_mode():
        times = interleaved_ms({"torchmetrics MulticlassJaccardIndex": theirs,
                                "SegmentationMeter": ours, "before: SegmentationMeter": ours_before},
                               device, args.warmup, args.repeats)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"device={device} threads={torch.get_num_threads()} probs=[{b}, {c}, {args.size[0]}, "
          f"{args.size[1]}] update+compute, repeats={args.repeats}")
    base = med["torchmetrics MulticlassJaccardIndex"]
    for k, v in med.items():
        print(f"  {k:40s} {v:8.1f} ms   / torchmetrics = {v / base:.2f}")


def bench_evaluate(args: argparse.Namespace, device: torch.device) -> None:
    g = torch.Generator().manual_seed(0)
    model = DUDESStudent(unet_family(args.model, args.classes)).to(device).eval()
    items = []
    for _ in range(args.items):
        mask = torch.randint(0, args.classes, tuple(args.size), generator=g)
        ood = torch.zeros(tuple(args.size), dtype=torch.bool)
        ood[10:40, 30:90] = True
        mask[ood] = 255
        items.append({"image": torch.rand(3, *args.size, generator=g), "mask": mask,
                      "ood_mask": ood})
    loader = DataLoader(items, batch_size=args.batch)
    fractions = [i / 10 for i in range(10)]

    def forward_only() -> None:
        for batch in loader:
            model(batch["image"].to(device))

    def full() -> None:
        evaluate(model, loader, args.classes, device=device, ood=True,
                 removal_fractions=fractions)

    with torch.inference_mode():
        times = interleaved_ms({"forward-only pass": forward_only, "evaluate": full}, device,
                               args.warmup, args.repeats)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"device={device} threads={torch.get_num_threads()} DUDESStudent(unet_family("
          f"{args.model!r})) {args.items} images {args.size[0]}x{args.size[1]}, batch "
          f"{args.batch}, every metric (mIoU, ECE, p(a|c), p(u|i), PAvPU, class-wise, "
          f"error/OOD AUROC+AP+FPR95, removal curve), repeats={args.repeats}")
    for k, v in med.items():
        print(f"  {k:20s} {v:9.1f} ms   / forward-only = {v / med['forward-only pass']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("figure", choices=["predict", "memory", "memory-child", "meter",
                                           "evaluate"])
    parser.add_argument("--model", default="M128", help="unet_family name (M128, M128/4, ...)")
    parser.add_argument("--members", type=int, default=10)
    parser.add_argument("--size", type=int, nargs=2, default=[256, 512], help="H W")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--classes", type=int, default=None)
    parser.add_argument("--items", type=int, default=8, help="evaluate: images")
    parser.add_argument("--variant", default="predict", help=argparse.SUPPRESS)
    add_timing_args(parser, warmup=2, repeats=7)
    args = parser.parse_args()
    args.classes = args.classes or (17 if args.figure == "meter" else 19)
    args.batch = args.batch or (4 if args.figure in ("meter", "evaluate") else 1)
    device = setup_run(args)
    {"predict": bench_predict, "memory": bench_memory, "memory-child": _memory_child,
     "meter": bench_meter, "evaluate": bench_evaluate}[args.figure](args, device)


if __name__ == "__main__":
    main()
