"""Where an AMT training step spends its time, from torch.profiler over a few real steps.

    python benchmarks/step_profile.py --arch amt_small [--batch 64] [--tokens 512] [--steps 5]
        [--data DIR] [--fp32 | --bf16-weights] [--torch-compile [--torch-compile-mode M]]

Runs the real `fairseq-train` in-process (bf16 autocast, or fp32, or bf16 weights; eager, or
compiled with --torch-compile; learned masking, the masker trained every update) and profiles
`--steps` updates after `--warmup` updates (compiling happens in the first). Prints:

- wall time per update, and device-busy time per update (the kernels' summed time): the gap
  between the two is the time the GPU waits for the host;
- the step's scopes by device time (CPU time on a CPU): the forward, and inside it the
  masker (its forward and Gumbel-top-k draw) and the predictor's forward; the rest of the
  forward is masking, corruption and the losses; then the backward;
- the ops with the most device time, and the ops with the most host (CPU) time.

On a CPU it runs too (--smoke sizes), with CPU times only. Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from zipf_corpus import make_corpus

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SCOPES = ("forward", "masker", "predictor", "backward")


def precision(args) -> str:
    """The run's precision and compile mode, in words."""
    words = "fp32" if args.fp32 else "bf16 weights" if args.bf16_weights else "bf16 autocast"
    if args.torch_compile:
        words += f", compiled ({args.torch_compile_mode} mode)"
    return words


def profile_steps(data: Path, save_dir: Path, args) -> tuple[torch.profiler.profile, float]:
    """(profiler, wall seconds per update) over args.steps updates after args.warmup;
    fairseq-train's start-up check writes into `save_dir` even with --no-save."""
    from fairseq import options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq.trainer import Trainer
    from fairseq_cli.train import main as train_main

    cuda = torch.cuda.is_available()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    prof = torch.profiler.profile(activities=activities)
    calls, wall = [0], [0.0]
    original = Trainer.train_step

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def profiled(self, *a, **k):
        i = calls[0]
        calls[0] += 1
        if i == args.warmup:
            sync()
            prof.start()
            wall[0] = time.perf_counter()
        try:
            return original(self, *a, **k)
        finally:
            if i == args.warmup + args.steps - 1:
                sync()
                wall[0] = time.perf_counter() - wall[0]
                prof.stop()

    argv = [str(data), "--user-dir", str(ROOT / "amt_plugin"),
            "--task", "adversarial_masked_lm", "--criterion", "adversarial_masked_lm",
            "--optimizer", "amt_adam", "--arch", args.arch, "--masker-warmup-updates", "0",
            "--tokens-per-sample", str(args.tokens), "--batch-size", str(args.batch),
            "--lr", "1e-4", "--max-update", str(args.warmup + args.steps), "--no-save",
            "--save-dir", str(save_dir), "--disable-validation", "--log-format", "none",
            "--seed", "1", "--num-workers", "2",
            *([] if args.fp32 else ["--bf16-weights" if args.bf16_weights else "--bf16-autocast"]),
            *(["--torch-compile", "--torch-compile-mode", args.torch_compile_mode]
              if args.torch_compile else []),
            *([] if cuda else ["--cpu"])]
    parser = options.get_training_parser()
    cfg = convert_namespace_to_omegaconf(options.parse_args_and_arch(parser, argv))
    Trainer.train_step = profiled
    try:
        train_main(cfg)
    finally:
        Trainer.train_step = original
    return prof, wall[0] / args.steps


def report(prof, wall: float, steps: int, top: int) -> None:
    from torch.autograd import DeviceType

    events = prof.key_averages()
    on_device = torch.cuda.is_available()
    # record_function ranges (ours, fairseq's, torch.optim's) are not ops; on the GPU they
    # also appear as annotation spans, which must not count as kernel time
    raw = prof.events()
    scopes = set(SCOPES) | {e.name for e in raw if getattr(e, "is_user_annotation", False)}

    def device(e) -> float:  # microseconds per update
        return e.self_device_time_total / steps if on_device else 0.0

    busy = sum(e.time_range.elapsed_us() for e in raw if e.device_type == DeviceType.CUDA
               and e.name not in scopes) / steps
    print(f"wall time per update: {1e3 * wall:.1f} ms")
    if on_device:
        print(f"device busy per update: {busy / 1e3:.1f} ms ({100 * busy / 1e6 / wall:.0f}% of "
              f"wall; the rest the GPU waits for the host)")
    by_name = {e.key: e for e in events}
    unit = "device" if on_device else "CPU"
    print(f"\n| scope | {unit} ms per update (inclusive) |\n|---|---|")
    for scope in SCOPES:
        e = by_name.get(scope)
        if e is not None:
            t = e.device_time_total if on_device else e.cpu_time_total
            print(f"| {scope} | {t / steps / 1e3:.2f} |")
    ops = [e for e in events if e.key not in scopes]
    if on_device:
        print("\n| op (most device time) | calls per update | ms per update | share |")
        print("|---|---|---|---|")
        for e in sorted(ops, key=device, reverse=True)[:top]:
            print(f"| {e.key[:70]} | {e.count / steps:g} | {device(e) / 1e3:.2f} | "
                  f"{100 * device(e) / max(busy, 1e-9):.1f}% |")
    print("\n| op (most host time) | calls per update | self CPU ms per update |")
    print("|---|---|---|")
    for e in sorted(ops, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]:
        print(f"| {e.key[:70]} | {e.count / steps:g} | "
              f"{e.self_cpu_time_total / steps / 1e3:.2f} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="amt_small")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--warmup", type=int, default=10, help="updates before profiling")
    p.add_argument("--steps", type=int, default=5, help="updates profiled")
    p.add_argument("--top", type=int, default=15)
    precisions = p.add_mutually_exclusive_group()
    precisions.add_argument("--fp32", action="store_true", help="no bf16 autocast")
    precisions.add_argument("--bf16-weights", action="store_true",
                   help="bf16 weights (amt_adam's fp32 master weights) instead of autocast")
    p.add_argument("--torch-compile", action="store_true",
                   help="compile the predictor's layers and the masker (the task's flag)")
    p.add_argument("--torch-compile-mode", default="default",
                   choices=["default", "reduce-overhead", "max-autotune"])
    p.add_argument("--data", type=Path, help="a fairseq data dir (default: a Zipf corpus)")
    p.add_argument("--smoke", action="store_true", help="tiny CPU sizes: the script runs")
    args = p.parse_args(argv)
    if args.smoke:
        args.arch, args.batch, args.tokens, args.warmup, args.steps = "amt_tiny", 4, 64, 2, 2
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or make_corpus(Path(tmp), 500 if args.smoke else 30000,
                                        2000 if args.smoke else 20000, 50, (50, 400),
                                        workers=os.cpu_count() or 1)
        prof, wall = profile_steps(data, Path(tmp) / "checkpoints", args)
    print(f"\n{args.arch}, {args.batch} x {args.tokens} tokens per update, {precision(args)}, "
          f"learned masking, {args.steps} updates profiled after {args.warmup}\n")
    report(prof, wall, args.steps, args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
