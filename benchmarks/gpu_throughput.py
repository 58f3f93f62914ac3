"""Throughput of AMT against stock fairseq masked_lm on one GPU: tokens/s, peak memory, MFU.

    python benchmarks/gpu_throughput.py [--updates 120] [--batch 64] [--tokens 512]
    python benchmarks/gpu_throughput.py --smoke      # CPU, tiny shapes: checks the script runs

Every run is the real `python -m fairseq_cli.train` on the same synthetic Zipf corpus (30k-word
vocabulary, made here), one after another in this script, so ratios compare like with like:
  base:  stock masked_lm roberta_base --fp16 (the baseline) | amt_base --fp16 | amt_base bf16
  small: stock masked_lm, amt_small's shape, --fp16         | amt_small --fp16 | amt_small bf16
tokens/s is fairseq's `wps`, median over the logging windows after the first third; peak
memory is torch.cuda.max_memory_allocated; MFU = tokens/s x training FLOPs per token / the
card's dense bf16 peak (--peak-tflops, default 989: H100 SXM). FLOPs per token count the
predictor (6 x dense weights, attention, the LM head on the masked 15%) and, for AMT, the
masker (forward on every update, backward when it trains).
"""

from __future__ import annotations

import argparse
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = (  # fairseq-train in-process, then report the peak GPU memory
    "import sys, torch; from fairseq_cli.train import cli_main\n"
    "try:\n    cli_main()\nfinally:\n"
    "    if torch.cuda.is_available():\n"
    "        print('PEAK_MEMORY_BYTES', torch.cuda.max_memory_allocated(), flush=True)\n"
)
SHAPES = {  # layers, width, heads, ffn; masker layers, width
    "base": (12, 768, 12, 3072, 2, 192),
    "small": (12, 256, 4, 1024, 2, 64),
    "tiny": (2, 128, 2, 512, 2, 32),
}


def make_data(workdir: Path, vocab: int, lines: int) -> Path:
    rng = random.Random(0)
    words = [f"w{i}" for i in range(vocab)]
    weights = [1 / (i + 1) for i in range(vocab)]
    for split, n in (("train", lines), ("valid", max(10, lines // 100))):
        with open(workdir / f"{split}.txt", "w") as f:
            for _ in range(n):
                f.write(" ".join(rng.choices(words, weights, k=rng.randint(50, 400))) + "\n")
    subprocess.run([sys.executable, "-m", "fairseq_cli.preprocess", "--only-source",
                    "--trainpref", str(workdir / "train.txt"),
                    "--validpref", str(workdir / "valid.txt"),
                    "--destdir", str(workdir / "bin"), "--workers", str(os.cpu_count() or 1)],
                   check=True, capture_output=True)
    return workdir / "bin"


def flops_per_token(shape: tuple, vocab: int, tokens: int, amt: bool, masker_trains: bool):
    layers, d, _, ffn, m_layers, m_d = shape
    dense = layers * (4 * d * d + 2 * d * ffn)
    attention = layers * 2 * tokens * d  # QK^T and AV, per token, forward
    head = 0.15 * (vocab * d + d * d)  # LM head on the masked positions
    total = 6 * dense + 3 * 2 * attention + 6 * head
    if amt:
        m_dense = m_layers * (4 * m_d * m_d + 2 * m_d * 4 * m_d)
        m_fwd = 2 * m_dense + 2 * m_layers * 2 * tokens * m_d
        total += m_fwd * (3 if masker_trains else 1)
    return total


def run(data: Path, flags: list[str], updates: int, cpu: bool) -> tuple[float, float]:
    log_every = max(1, updates // 12)
    cmd = [sys.executable, "-c", LAUNCH, str(data), "--max-update", str(updates),
           "--no-save", "--disable-validation", "--log-format", "simple",
           "--log-interval", str(log_every), "--no-progress-bar", "--seed", "1",
           "--num-workers", "2", *(["--cpu"] if cpu else []), *flags]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise SystemExit(f"run failed: {' '.join(flags)}\n{out[-3000:]}")
    wps = [float(x) for x in re.findall(r"\| train_inner \|.* wps=([\d.]+)", out)] or \
        [float(x) for x in re.findall(r"wps=([\d.]+)", out)]
    steady = wps[len(wps) // 3:] or wps
    peak = re.findall(r"PEAK_MEMORY_BYTES (\d+)", out)
    return statistics.median(steady), (int(peak[-1]) / 2**30 if peak else float("nan"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--updates", type=int, default=120)
    p.add_argument("--batch", type=int, default=64, help="sequences per update")
    p.add_argument("--tokens", type=int, default=512, help="tokens per sequence")
    p.add_argument("--vocab", type=int, default=30000)
    p.add_argument("--peak-tflops", type=float, default=989.0)
    p.add_argument("--shapes", default="base,small")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny shape, a few updates")
    args = p.parse_args(argv)
    cpu = args.smoke
    if args.smoke:
        args.updates, args.batch, args.tokens, args.vocab, args.shapes = 6, 4, 64, 500, "tiny"
    common = ["--tokens-per-sample", str(args.tokens), "--batch-size", str(args.batch),
              "--lr", "1e-4", "--weight-decay", "0.01", "--adam-betas", "(0.9,0.98)"]
    amt = ["--user-dir", str(ROOT / "amt_plugin"), "--task", "adversarial_masked_lm",
           "--criterion", "adversarial_masked_lm", "--optimizer", "amt_adam",
           "--masker-warmup-updates", "0"]
    half = [] if cpu else ["--fp16"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = make_data(Path(tmp), args.vocab, 2000 if args.smoke else 60000)
        for name in args.shapes.split(","):
            shape = SHAPES[name]
            layers, d, heads, ffn = shape[:4]
            stock_shape = ["--arch", "roberta", "--encoder-layers", str(layers),
                           "--encoder-embed-dim", str(d), "--encoder-attention-heads",
                           str(heads), "--encoder-ffn-embed-dim", str(ffn)]
            arch = "amt_tiny" if name == "tiny" else f"amt_{name}"
            runs = [
                (f"stock masked_lm {name} {'fp16' if half else 'fp32'}",
                 ["--task", "masked_lm", "--criterion", "masked_lm", "--optimizer", "adam",
                  *stock_shape, *half], False),
                (f"AMT {arch} {'fp16' if half else 'fp32'}",
                 [*amt, "--arch", arch, *half, *(["--fp16-no-flatten-grads"] if half else [])],
                 True),
                (f"AMT {arch} bf16", [*amt, "--arch", arch, "--bf16-autocast"], True),
            ]
            base = None
            for label, flags, is_amt in runs:
                wps, mem = run(data, common + flags, args.updates, cpu)
                base = base or wps
                flops = flops_per_token(shape, args.vocab, args.tokens, is_amt, True)
                mfu = wps * flops / (args.peak_tflops * 1e12)
                rows.append((label, wps, wps / base, mem, mfu))
                print(f"measured {label}: {wps:,.0f} tokens/s", file=sys.stderr, flush=True)
    device = "CPU (smoke: tiny shapes)" if cpu else "GPU"
    print(f"\n{device}, {args.batch} x {args.tokens} tokens per update, {args.updates} updates\n")
    print("| run | tokens/s | ratio to stock (same shape) | peak memory (GiB) | MFU |")
    print("|---|---|---|---|---|")
    for label, wps, ratio, mem, mfu in rows:
        print(f"| {label} | {wps:,.0f} | {ratio:.2f}x | {mem:.1f} | {100 * mfu:.1f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
