"""Host-side work per training update: operator calls and host-device syncs, AMT against stock.

    .venv/bin/python benchmarks/host_overhead.py [--updates 12] [--arch amt_tiny]
        [--host-updates 40]

On a GPU every operator call is a kernel launch that the CPU must issue, and every sync
(`.item()`, `bool(tensor)`, boolean-mask indexing, `nonzero`, `unique`, ...) stalls the CPU
until the GPU has drained its queue. At small shapes both bound the update rate, so they are
worth counting, and they can be counted exactly on a CPU: this script runs the real
`fairseq-train` in-process with a TorchDispatchMode that records every aten call made inside
`Trainer.train_step` (forward, backward, clipping, optimizer step, logging), and classifies
the ops that would force a sync on a GPU. Reported per update, median over the updates after
the first two. Not counted, because a CPU run cannot see them: device-to-host copies
(`.cpu()`, `.tolist()`) and reads of the optimizer's step counters, which torch keeps on the
host. Counted although they are no syncs for AMT on a GPU: the trainer's two reads of the
gradient norm (`_local_scalar_dense`), which there read the host copy of the previous
update's norm (see amt_plugin/optimizer.py; on a CPU the norm is read in its own update).
On a GPU, tests/unit/test_devices.py runs fairseq-train updates under torch's sync debug
mode to check that none drains the GPU's queue. The aten call counts are CPU ones:
on a GPU, stock fairseq --fp16 steps one flattened parameter instead of each one.

Then the host time itself: each run again at the architecture's depth but 16 wide, timing
`Trainer.train_step`, so what is measured is Python and dispatch, not arithmetic: fairseq's
per-update bookkeeping, the criterion's, the optimizer's. Reported as milliseconds per update
and as a ratio to stock measured in the same script. A CPU's host time is not a GPU host's,
but the two move together.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from zipf_corpus import make_corpus

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# aten ops whose output size or value the host must read: a GPU sync each time.
SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "_unique", "_unique2",
            "unique_dim", "unique_consecutive", "repeat_interleave", "item"}


def in_optimizer_step() -> bool:
    """torch optimizers keep their step counters on the host (unless fused or capturable):
    reading those is not a device sync, so it is not counted."""
    frame = sys._getframe(2)
    while frame is not None:
        if f"torch{os.sep}optim{os.sep}" in frame.f_code.co_filename:
            return True
        frame = frame.f_back
    return False


def is_sync(func, args) -> bool:
    name = func.__name__.split(".")[0]
    if name in SYNC_OPS:
        return name != "_local_scalar_dense" or not in_optimizer_step()
    if name in ("index", "index_put", "index_put_", "_index_put_impl_"):
        indices = args[1] if len(args) > 1 else []
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or [])
    return False


class Counter(TorchDispatchMode):
    """Counts aten calls while `active`; one Counter per training run."""

    def __init__(self) -> None:
        super().__init__()
        self.active = False
        self.ops = 0
        self.syncs = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.active:
            self.ops += 1
            if is_sync(func, args):
                self.syncs[func.__name__.split(".")[0]] += 1
        return func(*args, **(kwargs or {}))


def train_in_process(data: Path, flags: list[str], updates: int, wrap, context) -> None:
    """Run fairseq-train on `data` in this process (CPU, 8 x 64 tokens per update), inside
    `context`, with `Trainer.train_step` replaced by `wrap(original train_step)`."""
    from fairseq import options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq.trainer import Trainer
    from fairseq_cli.train import main as train_main

    argv = [str(data), "--max-update", str(updates), "--cpu", "--num-workers", "0",
            "--no-save", "--save-dir", str(data / "checkpoints"), "--disable-validation",
            "--log-format", "none", "--seed", "1",
            "--tokens-per-sample", "64", "--batch-size", "8", "--lr", "1e-4", *flags]
    parser = options.get_training_parser()
    cfg = convert_namespace_to_omegaconf(options.parse_args_and_arch(parser, argv))
    original = Trainer.train_step
    Trainer.train_step = wrap(original)
    try:
        with context:
            train_main(cfg)
    finally:
        Trainer.train_step = original


def count(data: Path, flags: list[str], updates: int) -> tuple[float, float, dict]:
    """Median aten calls and syncs per update of one in-process fairseq-train run."""
    counter = Counter()
    per_update: list[tuple[int, collections.Counter]] = []

    def wrap(original):
        def counted(self, *args, **kwargs):
            counter.ops, counter.syncs = 0, collections.Counter()
            counter.active = True
            try:
                return original(self, *args, **kwargs)
            finally:
                counter.active = False
                per_update.append((counter.ops, counter.syncs))
        return counted

    train_in_process(data, flags, updates, wrap, counter)
    steady = per_update[2:] or per_update
    kinds = collections.Counter()
    for _, syncs in steady:
        kinds.update(syncs)
    return (statistics.median(o for o, _ in steady),
            statistics.median(sum(s.values()) for _, s in steady),
            {k: v / len(steady) for k, v in sorted(kinds.items())})


def host_time(data: Path, flags: list[str], updates: int) -> float:
    """Median milliseconds per `Trainer.train_step` of one in-process fairseq-train run of a
    model too narrow for its arithmetic to matter: what is left is host time (Python,
    dispatch), the cost that bounds a GPU at small shapes."""
    times: list[float] = []

    def wrap(original):
        def timed(self, *args, **kwargs):
            start = time.perf_counter()
            try:
                return original(self, *args, **kwargs)
            finally:
                times.append(time.perf_counter() - start)
        return timed

    train_in_process(data, flags, updates, wrap, contextlib.nullcontext())
    return 1e3 * statistics.median(times[5:] or times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--updates", type=int, default=12)
    p.add_argument("--arch", default="amt_tiny")
    p.add_argument("--host-updates", type=int, default=40,
                   help="updates of each host-time run")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from fairseq.models import ARCH_CONFIG_REGISTRY

    import amt_plugin  # noqa: F401  (registers the architectures for the shape lookup)

    shape = argparse.Namespace()
    ARCH_CONFIG_REGISTRY[args.arch](shape)
    stock_shape = ["--encoder-layers", str(shape.encoder_layers),
                   "--encoder-embed-dim", str(shape.encoder_embed_dim),
                   "--encoder-ffn-embed-dim", str(shape.encoder_ffn_embed_dim),
                   "--encoder-attention-heads", str(shape.encoder_attention_heads)]
    amt = ["--user-dir", str(ROOT / "amt_plugin"), "--task", "adversarial_masked_lm",
           "--criterion", "adversarial_masked_lm", "--arch", args.arch,
           "--optimizer", "amt_adam", "--masker-warmup-updates", "0", "--clip-norm", "1.0"]
    runs = {
        "stock masked_lm, adam": ["--task", "masked_lm", "--criterion", "masked_lm",
                                  "--arch", "roberta", "--optimizer", "adam",
                                  "--clip-norm", "1.0", *stock_shape],
        "AMT random (no masker)": [*amt, "--masking-strategy", "random"],
        "AMT learned, masker resting (update freq 1000)": [*amt, "--masker-update-freq",
                                                           "1000"],
        "AMT learned, masker trains": amt,
        "AMT learned, masker trains, bf16 autocast": [*amt, "--bf16-autocast"],
        "AMT learned, masker trains, bf16 weights": [*amt, "--bf16-weights"],
    }
    narrow = ["--encoder-embed-dim", "16", "--encoder-ffn-embed-dim", "64",
              "--encoder-attention-heads", "1"]
    narrow_masker = ["--masker-embed-dim", "16", "--masker-ffn-embed-dim", "64",
                     "--masker-attention-heads", "1"]
    rows, host = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        data = make_corpus(Path(tmp), 2000, 3000, 100, (10, 60))
        for name, flags in runs.items():
            ops, syncs, kinds = count(data, flags, args.updates)
            rows.append((name, ops, syncs, kinds))
            amt_run = "--user-dir" in flags
            host[name] = host_time(data, [*flags, *narrow, *(narrow_masker if amt_run else [])],
                                   args.host_updates)
            print(f"measured {name}", file=sys.stderr, flush=True)
    print(f"\n{args.arch} shape, 8 x 64 tokens per update, CPU, per update (median over "
          f"updates 3-{args.updates})\n")
    print("| run | aten calls (~kernel launches) | host-device syncs | syncs by op |")
    print("|---|---|---|---|")
    for name, ops, syncs, kinds in rows:
        detail = ", ".join(f"{k} {v:g}" for k, v in kinds.items())
        print(f"| {name} | {ops:,.0f} | {syncs:g} | {detail} |")
    stock = host[next(iter(runs))]
    print(f"\nHost time per update: the same runs {args.arch}'s depth but 16 wide (masker "
          f"too), so that arithmetic is negligible; median over updates 6-{args.host_updates}"
          f"\n")
    print("| run | host ms per update | ratio to stock |")
    print("|---|---|---|")
    for name, ms in host.items():
        print(f"| {name} | {ms:.1f} | {ms / stock:.2f}x |")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
