"""Tokens/s of AMT against stock fairseq masked_lm, same predictor shape, data and batch.

    .venv/bin/python benchmarks/cpu_throughput.py [--updates 150] [--arch amt_tiny]

Both runs use the real `fairseq-train` on one synthetic Zipf corpus (made here), one after
the other in this script, so the ratio compares like with like on this machine. Reported:
steady-state words per second (fairseq's `wps`, after the first logging window), and the
ratio AMT / stock. Variants: AMT with learned masking (the masker chooses and trains every
update), AMT with --masking-strategy random (the same code without the masker's work), and
learned masking with the masker trained every 4th update. Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from zipf_corpus import make_corpus

ROOT = Path(__file__).resolve().parents[1]
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
              "--cpu", "--num-workers", "0", "--no-save", "--disable-validation",
              "--log-format", "json", "--log-interval", "10", "--no-progress-bar", "--seed", "1"]
    proc = subprocess.run(common + flags, capture_output=True, text=True, env=ENV)
    if proc.returncode != 0:
        raise SystemExit(proc.stdout[-2000:] + proc.stderr[-2000:])
    logs = [json.loads(x[x.index("{"):]) for x in (proc.stdout + proc.stderr).splitlines()
            if "| train_inner | {" in x]
    return statistics.median(float(x["wps"]) for x in logs[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--updates", type=int, default=150)
    parser.add_argument("--arch", default="amt_tiny")
    parser.add_argument("--lines", type=int, default=20000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = make_corpus(Path(tmp), 5000, args.lines, args.lines // 20, (10, 60), workers=2)
        amt = ["--user-dir", str(ROOT / "amt_plugin"), "--task", "adversarial_masked_lm",
               "--criterion", "adversarial_masked_lm", "--arch", args.arch,
               "--masker-warmup-updates", "0"]
        runs = {
            "stock masked_lm (roberta)": ["--task", "masked_lm", "--criterion", "masked_lm",
                                          "--arch", "roberta", *shape_flags(args.arch)],
            "AMT learned, masker every update": [*amt, "--optimizer", "amt_adam"],
            "AMT learned, masker every 4th": [*amt, "--optimizer", "amt_adam",
                                              "--masker-update-freq", "4"],
            "AMT random (no masker work)": [*amt, "--masking-strategy", "random"],
        }
        results = {}
        for name, flags in runs.items():
            results[name] = wps(data, args.updates, flags)
            print(f"measured {name}: {results[name]:.0f} tokens/s", file=sys.stderr)
    base = results["stock masked_lm (roberta)"]
    print(f"\n{args.arch} shape, 32 x 128 tokens per update, {args.updates} updates, "
          f"{os.cpu_count()} CPU threads\n")
    print("| run | tokens/s | ratio to stock |\n|---|---|---|")
    for name, value in results.items():
        print(f"| {name} | {value:,.0f} | {value / base:.2f}x |")


if __name__ == "__main__":
    main()
