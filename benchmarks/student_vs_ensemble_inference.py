"""Benchmark 1 (DUDES Table 3): inference time of the plain segmenter, the DUDES student and an
N-member deep ensemble at the same input.

Goal: the student within 2% of the plain segmenter (its extra head is one 1-channel conv), the
ensemble about N x (DUDES: 18.5 ms student vs 217.1 ms for 10 members on an RTX 3090).

Runs on CUDA when available (synchronised timing, vectorize="auto" picks vmap there), else CPU.
Timings are interleaved round-robin (one call of each model per round) and summarised by the
median, so a busy shared machine slows all models alike rather than whichever ran last.

    python benchmarks/student_vs_ensemble_inference.py                  # DeepLabV3+ ResNet18
    python benchmarks/student_vs_ensemble_inference.py --arch unet-tiny --size 64 128
"""

from __future__ import annotations

import argparse
import statistics

import torch
from _common import add_timing_args, interleaved_ms, make_segmenter, setup_run

from minikd.ensembles import DeepEnsemble
from minikd.models import DUDESStudent, count_parameters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=["deeplabv3plus-resnet18", "unet-tiny"],
                        default="deeplabv3plus-resnet18")
    parser.add_argument("--members", type=int, default=10, help="N (DUDES: 10)")
    parser.add_argument("--size", type=int, nargs=2, default=[256, 512], help="H W")
    parser.add_argument("--batch", type=int, default=1, help="DUDES Table 3: one image")
    parser.add_argument("--classes", type=int, default=19)
    add_timing_args(parser, warmup=3, repeats=25)  # DUDES times 25 runs
    args = parser.parse_args()
    device = setup_run(args)
    plain = make_segmenter(args.arch, args.classes).to(device).eval()
    student = DUDESStudent(plain).to(device).eval()  # shares the plain model's weights
    members = [make_segmenter(args.arch, args.classes).to(device).eval()
               for _ in range(args.members)]
    ensemble = DeepEnsemble(members, vectorize="auto")
    x = torch.rand(args.batch, 3, *args.size, device=device)
    fns = {"plain": lambda: plain(x), "student": lambda: student(x),
           "ensemble": lambda: ensemble.predict(x),
           "members": lambda: ensemble.forward_members(x)}  # the N passes without statistics
    with torch.inference_mode():
        times = interleaved_ms(fns, device, args.warmup, args.repeats)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"device={device} threads={torch.get_num_threads()} arch={args.arch} "
          f"input={args.batch}x3x{args.size[0]}x{args.size[1]} N={args.members} "
          f"repeats={args.repeats} vmap={ensemble._use_vmap(x)}")
    params = {"plain": count_parameters(plain), "student": count_parameters(student),
              "ensemble": sum(count_parameters(m) for m in members)}
    params["members"] = params["ensemble"]
    for k, v in times.items():
        q1, _, q3 = statistics.quantiles(v, n=4)
        print(f"  {k:9s} median {med[k]:9.2f} ms  (IQR {q1:.2f}-{q3:.2f})  "
              f"params {params[k]:,}")
    print(f"student / plain    = {med['student'] / med['plain']:.3f}  (goal <= 1.02)")
    print(f"ensemble / plain   = {med['ensemble'] / med['plain']:.2f}  (goal ~ N = {args.members})")
    print(f"members  / plain   = {med['members'] / med['plain']:.2f}  (the N forward passes "
          "alone; the rest is the statistics, streamed over the members)")
    print(f"ensemble / student = {med['ensemble'] / med['student']:.2f}  (DUDES: 217.1/18.5 = 11.7)")


if __name__ == "__main__":
    main()
