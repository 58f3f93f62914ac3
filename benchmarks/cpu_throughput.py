"""Tokens/s of AMT against stock fairseq masked_lm, same predictor shape, data and batch.

    .venv/bin/python benchmarks/cpu_throughput.py [--updates 100] [--rounds 3] [--arch amt_tiny]

Every run is the real `fairseq-train` on one synthetic Zipf corpus (made here), in this
script, so the ratio compares like with like on this machine. Variants: stock masked_lm, AMT
with learned masking (the masker chooses and trains every update), learned masking with the
masker trained every 4th update, and AMT with --masking-strategy random (the same code
without the masker's work). They run in rounds, each round every variant once in a rotated
order, because a CPU's speed drifts over minutes: a ratio is taken within a round, against
that round's stock run. Reported: steady-state words per second (fairseq's `wps`, median of
the logging windows after the first; then the median over rounds), and the median ratio to
stock over rounds with its range. Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from zipf_corpus import make_corpus

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from amt_plugin import logs  # noqa: E402

BIN = Path(sys.executable).parent
ENV = {**os.environ, "OMP_NUM_THREADS": str(os.cpu_count() or 1)}


def shape_flags(arch: str) -> list[str]:
    """The predictor shape of an amt_* architecture, spelled for stock roberta."""
    sys.path.insert(0, str(ROOT))
    from fairseq.models import ARCH_CONFIG_REGISTRY

    import amt_plugin  # noqa: F401

    a = argparse.Namespace()
    ARCH_CONFIG_REGISTRY[arch](a)
    return ["--encoder-layers", str(a.encoder_layers),
            "--encoder-embed-dim", str(a.encoder_embed_dim),
            "--encoder-ffn-embed-dim", str(a.encoder_ffn_embed_dim),
            "--encoder-attention-heads", str(a.encoder_attention_heads)]


def wps(data: Path, updates: int, flags: list[str]) -> float:
    common = [str(BIN / "fairseq-train"), str(data), "--optimizer", "adam", "--lr", "5e-4",
              "--tokens-per-sample", "128", "--batch-size", "32", "--max-update", str(updates),
              "--cpu", "--num-workers", "0", "--no-save", "--save-dir", str(data / "checkpoints"),
              "--disable-validation", "--log-format", "json", "--log-interval", "10",
              "--no-progress-bar", "--seed", "1"]
    proc = subprocess.run(common + flags, capture_output=True, text=True, env=ENV)
    if proc.returncode != 0:
        raise SystemExit(proc.stdout[-2000:] + proc.stderr[-2000:])
    inner = logs.records(proc.stdout + proc.stderr, "train_inner")
    return statistics.median(x["wps"] for x in inner[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--updates", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--arch", default="amt_tiny")
    parser.add_argument("--lines", type=int, default=20000)
    args = parser.parse_args()
    stock = "stock masked_lm (roberta)"
    with tempfile.TemporaryDirectory() as tmp:
        data = make_corpus(Path(tmp), 5000, args.lines, args.lines // 20, (10, 60), workers=2)
        amt = ["--user-dir", str(ROOT / "amt_plugin"), "--task", "adversarial_masked_lm",
               "--criterion", "adversarial_masked_lm", "--arch", args.arch,
               "--masker-warmup-updates", "0"]
        runs = {
            stock: ["--task", "masked_lm", "--criterion", "masked_lm",
                    "--arch", "roberta", *shape_flags(args.arch)],
            "AMT learned, masker every update": [*amt, "--optimizer", "amt_adam"],
            "AMT learned, masker every 4th": [*amt, "--optimizer", "amt_adam",
                                              "--masker-update-freq", "4"],
            "AMT random (no masker work)": [*amt, "--masking-strategy", "random"],
        }
        names = list(runs)
        results: dict[str, list[float]] = {name: [] for name in names}
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                results[name].append(wps(data, args.updates, runs[name]))
                print(f"round {r + 1}: {name}: {results[name][-1]:.0f} tokens/s",
                      file=sys.stderr, flush=True)
    print(f"\n{args.arch} shape, 32 x 128 tokens per update, {args.updates} updates per run, "
          f"{args.rounds} rounds, {os.cpu_count()} CPU threads\n")
    print("| run | tokens/s (median over rounds) | ratio to stock, median [min, max] |")
    print("|---|---|---|")
    for name, values in results.items():
        ratios = [v / b for v, b in zip(values, results[stock])]
        print(f"| {name} | {statistics.median(values):,.0f} | "
              f"{statistics.median(ratios):.2f}x [{min(ratios):.2f}, {max(ratios):.2f}] |")


if __name__ == "__main__":
    main()
