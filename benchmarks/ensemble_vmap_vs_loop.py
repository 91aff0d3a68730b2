"""Benchmark 3: vectorised (torch.func.vmap) vs looped deep ensemble, inference and training.

Inference: ``DeepEnsemble(vectorize=True).predict`` vs ``vectorize=False`` (same numbers; the
test suite checks that). Training: one step of M members, each on its own batch, either as a
loop (M forwards/backwards, one optimizer over all members) or as one ``VectorizedEnsemble``
call (stacked parameters, one optimizer) — the two update rules are identical.

On a CPU no gain is expected (each member's conv already uses every core; vmap adds stacking and
batching-rule overhead); on a GPU, small members leave the device idle between kernels, which
vmap fills. The script runs on CUDA when available, else on CPU. Interleaved rounds, medians.

    python benchmarks/ensemble_vmap_vs_loop.py                      # UNet tiny, N=4
    python benchmarks/ensemble_vmap_vs_loop.py --arch deeplabv3plus-resnet18 --size 128 256
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F
from _common import add_timing_args, interleaved_ms, make_segmenter, setup_run

from minikd.ensembles import DeepEnsemble, stack_members


def median_ms(fns, device: torch.device, warmup: int, repeats: int) -> dict[str, float]:
    """Median per-call wall time in ms of interleaved rounds."""
    return {k: statistics.median(v)
            for k, v in interleaved_ms(fns, device, warmup, repeats).items()}


def training_steps(members: list[torch.nn.Module], x: torch.Tensor, y: torch.Tensor):
    """(loop_step, vmap_step) closures doing one SGD step on every member."""
    loop_opt = torch.optim.SGD([p for m in members for p in m.parameters()], lr=1e-3,
                               momentum=0.9)
    vec = stack_members(members).train()
    vec_opt = torch.optim.SGD(vec.parameters(), lr=1e-3, momentum=0.9)

    def loop_step() -> None:
        loop_opt.zero_grad()
        loss = sum(F.cross_entropy(m(xi), yi) for m, xi, yi in zip(members, x, y))
        loss.backward()
        loop_opt.step()

    def vmap_step() -> None:
        vec_opt.zero_grad()
        logits = vec(x, per_member=True)["logits"]  # [M,B,C,H,W]
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(0, 1)) * len(members)
        loss.backward()
        vec_opt.step()

    return loop_step, vmap_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=["unet-tiny", "deeplabv3plus-resnet18"],
                        default="unet-tiny")
    parser.add_argument("--members", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, nargs=2, default=[64, 128], help="H W")
    parser.add_argument("--classes", type=int, default=12)
    add_timing_args(parser, warmup=3, repeats=20)
    args = parser.parse_args()
    device = setup_run(args)
    members = [make_segmenter(args.arch, args.classes).to(device) for _ in range(args.members)]
    x = torch.rand(args.batch, 3, *args.size, device=device)
    for m in members:
        m.eval()
    loop, vmap = DeepEnsemble(members, vectorize=False), DeepEnsemble(members, vectorize=True)
    with torch.inference_mode():
        infer = median_ms({"loop": lambda: loop.predict(x), "vmap": lambda: vmap.predict(x)},
                          device, args.warmup, args.repeats)
    for m in members:
        m.train()
    xs = torch.rand(args.members, args.batch, 3, *args.size, device=device)
    ys = torch.randint(0, args.classes, (args.members, args.batch, *args.size), device=device)
    loop_step, vmap_step = training_steps(members, xs, ys)
    train = median_ms({"loop": loop_step, "vmap": vmap_step}, device, args.warmup, args.repeats)
    print(f"device={device} threads={torch.get_num_threads()} arch={args.arch} "
          f"N={args.members} batch={args.batch}x3x{args.size[0]}x{args.size[1]} "
          f"repeats={args.repeats}")
    for name, t in (("inference (predict)", infer), ("training step", train)):
        print(f"  {name:20s} loop {t['loop']:9.2f} ms  vmap {t['vmap']:9.2f} ms  "
              f"vmap/loop = {t['vmap'] / t['loop']:.2f}")


if __name__ == "__main__":
    main()
