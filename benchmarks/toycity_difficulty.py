"""How hard ToyCity is: quick-mode training of a small network, evaluated in and across domains.

Issue 2 asks that, after a quick-mode training of a small network, source validation mIoU lands
between about 0.45 and 0.85 (not saturated), thin and rare classes stay clearly below road, sky
and building, errors concentrate at boundaries and on thin or rare objects, and a model trained
on the source domain loses about 15+ mIoU points on the target domain (but not everything).
A colour-only baseline (a per-pixel MLP on RGB) shows that no class is separable by colour alone.

Usage:
    python benchmarks/toycity_difficulty.py                      # M128, 600 it: ~2-3 min
    python benchmarks/toycity_difficulty.py --model 4,64 --iters 400  # the tiny U-Net
    python benchmarks/toycity_difficulty.py --model 4,64 --iters 3000 --n-train 1000

Measured (M128, 64x128, 2-core CPU, 600 iterations, ~110 s at one thread): source val mIoU
0.56, target val 0.33 (a 23-point drop; benchmarks/RESULTS.md). The 122k-parameter UNet(4, 64)
(`--model 4,64 --iters 400`) reaches only 0.31 source mIoU after 400 iterations and 0.45 after
3000.

Prints mIoU and per-class IoU on source val and target val, the source->target drop, and error
rates at label boundaries vs interiors. mIoU comes from a plain confusion matrix in this file.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from _common import small_model

from minikd.data import ToyCity, eval_transforms

THIN = ("pole", "traffic light", "traffic sign", "fence", "bicycle")
RARE = ("truck", "bus", "rider")
EASY = ("road", "sky", "building")


def colour_only_baseline(data: dict, val: dict, num_classes: int, iters: int) -> torch.Tensor:
    """Train a per-pixel MLP on RGB alone (random pixels of the training images); return its
    predictions on `val`. It can only use a pixel's colour, so its mIoU bounds what colour
    alone tells about the class."""
    mlp = torch.nn.Sequential(torch.nn.Linear(3, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64),
                              torch.nn.ReLU(), torch.nn.Linear(64, num_classes))
    opt = torch.optim.Adam(mlp.parameters(), lr=3e-3)
    x = data["image"].permute(0, 2, 3, 1).reshape(-1, 3)
    y = data["mask"].reshape(-1)
    g = torch.Generator().manual_seed(0)
    for _ in range(iters):
        idx = torch.randint(0, len(x), (4096,), generator=g)
        loss = F.cross_entropy(mlp(x[idx]), y[idx], ignore_index=255)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        v = val["image"].permute(0, 2, 3, 1)
        return mlp(v).argmax(-1)


def stack(ds: ToyCity) -> dict[str, torch.Tensor]:
    """The whole (small) data set as batched tensors."""
    return torch.utils.data.default_collate([ds[i] for i in range(len(ds))])


def class_weights(labels: torch.Tensor, num_classes: int, power: float) -> torch.Tensor:
    """Mild class balancing: weight (median frequency / frequency) ** power, at most 10."""
    freq = torch.bincount(labels[labels != 255], minlength=num_classes).double()
    freq = freq / freq.sum()
    w = (freq[freq > 0].median() / freq.clamp(min=1e-6)) ** power
    return w.clamp(max=10).float()


def train(model, data: dict, iters: int, batch: int, lr: float, seed: int = 0,
          weight: torch.Tensor | None = None) -> float:
    """Adam + cross-entropy with random horizontal flips; returns seconds spent."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=iters)
    model.train()
    t0 = time.perf_counter()
    n = len(data["image"])
    for it in range(iters):
        if it and it % 100 == 0:
            print(f"    iteration {it}, {time.perf_counter() - t0:.0f} s", flush=True)
        idx = torch.randint(0, n, (batch,), generator=g)
        x, y = data["image"][idx], data["mask"][idx]
        if torch.rand((), generator=g) < 0.5:
            x, y = x.flip(-1), y.flip(-1)
        loss = F.cross_entropy(model(x), y, weight=weight, ignore_index=255)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return time.perf_counter() - t0


@torch.no_grad()
def predict(model, data: dict, batch: int = 32) -> torch.Tensor:
    model.eval()
    return torch.cat([model(data["image"][i:i + batch]).argmax(1)
                      for i in range(0, len(data["image"]), batch)])


def confusion(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    valid = labels != 255
    idx = labels[valid] * num_classes + pred[valid]
    return torch.bincount(idx, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def iou_per_class(cm: torch.Tensor) -> torch.Tensor:
    """IoU per class; NaN for classes absent from both labels and predictions."""
    tp = cm.diag().double()
    union = cm.sum(0).double() + cm.sum(1).double() - tp
    return torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))


def boundary_mask(labels: torch.Tensor, radius: int = 1) -> torch.Tensor:
    """Pixels within `radius` of a pixel with a different label."""
    lab = labels.float().unsqueeze(1)
    k = 2 * radius + 1
    hi = F.max_pool2d(lab, k, 1, radius)
    lo = -F.max_pool2d(-lab, k, 1, radius)
    return (hi != lo).squeeze(1)


def report(name: str, pred, labels, num_classes: int) -> dict:
    cm = confusion(pred, labels, num_classes)
    iou = iou_per_class(cm)
    miou = float(iou.nanmean())
    valid = labels != 255
    wrong = (pred != labels) & valid
    edge = boundary_mask(labels) & valid
    inner = valid & ~edge
    err_edge = float(wrong[edge].float().mean())
    err_inner = float(wrong[inner].float().mean())
    share = float(wrong[edge].sum() / wrong.sum().clamp(min=1))
    print(f"  {name:12s} mIoU {miou:.3f}  pixel acc {1 - float(wrong[valid].float().mean()):.3f}"
          f"  error rate at boundaries {err_edge:.3f} vs interior {err_inner:.3f}"
          f"  ({share:.0%} of errors on the {float(edge.sum() / valid.sum()):.0%} boundary px)")
    return {"miou": miou, "iou": iou}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="M128",
                        help='U-Net name ("M128/4", "M128") or "depth,bridge" such as "4,64" '
                             '(default M128, the U-Net KD paper\'s smallest U-Net)')
    parser.add_argument("--size", default="64x128")
    parser.add_argument("--n-train", type=int, default=500)
    parser.add_argument("--n-val", type=int, default=100)
    parser.add_argument("--iters", type=int, default=600)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--balance", type=float, default=0.5,
                        help="class-weight power (0: plain cross-entropy)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a shared 2-core CPU, 2 threads were 30x slower)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    size = tuple(int(s) for s in args.size.split("x"))
    torch.manual_seed(args.seed)
    C = ToyCity.NUM_CLASSES
    t0 = time.perf_counter()
    norm = eval_transforms()
    train_set = stack(ToyCity(args.n_train, size, "train", "source", transform=norm))
    train_raw = {"image": train_set["image"], "mask": train_set["mask"]}
    val = {d: stack(ToyCity(args.n_val, size, "val", d, transform=norm))
           for d in ("source", "target")}
    print(f"generated {args.n_train} train + 2x{args.n_val} val images at {size[0]}x{size[1]} "
          f"in {time.perf_counter() - t0:.1f} s")

    model, desc = small_model(args.model, C)
    weight = class_weights(train_set["mask"], C, args.balance) if args.balance > 0 else None
    secs = train(model, train_set, args.iters, args.batch, args.lr, args.seed, weight)
    print(f"\n{desc}: {args.iters} iterations x batch {args.batch} (Adam, one-cycle lr "
          f"{args.lr}, class weights (median freq / freq)^{args.balance}) in {secs:.0f} s")
    res = {d: report(f"{d} val", predict(model, v), v["mask"], C) for d, v in val.items()}
    drop = res["source"]["miou"] - res["target"]["miou"]
    print(f"  source -> target drop: {100 * drop:.1f} mIoU points "
          f"(target keeps {res['target']['miou'] / res['source']['miou']:.0%})")

    print("\n  per-class IoU        source  target")
    for c, name in enumerate(ToyCity.CLASSES):
        tag = "thin" if name in THIN else "rare" if name in RARE else "easy" if name in EASY else ""
        print(f"  {name:15s} {tag:5s} {res['source']['iou'][c]:6.3f}  {res['target']['iou'][c]:6.3f}")
    groups = {g: [ToyCity.CLASSES.index(n) for n in names]
              for g, names in (("easy", EASY), ("thin", THIN), ("rare", RARE))}
    for g, ids in groups.items():
        print(f"  mean IoU {g:5s} (source): {float(res['source']['iou'][ids].nanmean()):.3f}")

    print("\ncolour-only per-pixel MLP (RGB of one pixel -> class):")
    blind = colour_only_baseline(train_raw, val["source"], C, 1000)
    report("source val", blind, val["source"]["mask"], C)


if __name__ == "__main__":
    main()
