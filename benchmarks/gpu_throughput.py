"""Throughput of AMT against stock fairseq masked_lm on one GPU: tokens/s, peak memory, MFU;
and whether bf16 training tracks fp32.

    python benchmarks/gpu_throughput.py [--updates 120] [--batch 64] [--tokens 512]
    python benchmarks/gpu_throughput.py --numerics [--numerics-updates 300]
    python benchmarks/gpu_throughput.py --smoke      # CPU, tiny shapes: checks the script runs

Every run is the real `python -m fairseq_cli.train` on the same synthetic Zipf corpus (30k-word
vocabulary, made here), one after another in this script, so ratios compare like with like.
Per shape (base = RoBERTa-base, small = amt_small's 12 x 256):

  stock masked_lm --fp16 (the baseline) | AMT --fp16 | AMT bf16 | AMT bf16 --torch-compile
  | AMT bf16 with --masking-strategy random (the same run without the masker's work)

tokens/s is fairseq's `wps`, median over the logging windows after the first third; peak
memory is torch.cuda.max_memory_allocated; MFU = tokens/s x training FLOPs per token / the
card's dense bf16 peak (--peak-tflops, default 989: H100 SXM). FLOPs per token count the
predictor (6 x dense weights, attention, the LM head on the masked 15%) and, for AMT, the
masker (forward on every update, backward when it trains). The masker's share of step time is
1 - (tokens/s with the masker) / (tokens/s without it). A run that fails is reported as such
and the others go on.

--numerics trains amt_small in fp32 and in bf16 on the same data and seed (dropout off), under
random masking (train loss: the same masks in both runs) and learned masking (fixed-mask
validation loss), and prints the curves and the largest gap, in bits.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from zipf_corpus import make_corpus

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
ARCH = {"base": "amt_base", "small": "amt_small", "tiny": "amt_tiny"}


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


def train(data: Path, flags: list[str], cpu: bool, timeout: int) -> str:
    """One fairseq-train run; its whole log. Raises RuntimeError with the log's tail."""
    cmd = [sys.executable, "-c", LAUNCH, str(data), "--log-format", "simple",
           "--no-progress-bar", "--seed", "1", "--num-workers", "2",
           *(["--cpu"] if cpu else []), *flags]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"timed out after {timeout} s") from e
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(out[-3000:])
    return out


def throughput(data: Path, flags: list[str], updates: int, cpu: bool, timeout: int):
    """(tokens/s, peak GiB) of one run."""
    log_every = max(1, updates // 12)
    out = train(data, ["--max-update", str(updates), "--no-save", "--disable-validation",
                       "--log-interval", str(log_every), *flags], cpu, timeout)
    wps = [float(x) for x in re.findall(r"\| train_inner \|.* wps=([\d.]+)", out)] or \
        [float(x) for x in re.findall(r"wps=([\d.]+)", out)]
    if not wps:
        raise RuntimeError("no wps in the log:\n" + out[-2000:])
    steady = wps[len(wps) // 3:] or wps
    peak = re.findall(r"PEAK_MEMORY_BYTES (\d+)", out)
    return statistics.median(steady), (int(peak[-1]) / 2**30 if peak else float("nan"))


def runs_for(name: str, half: list[str], amt: list[str], stock_shape: list[str]) -> list:
    """(label, flags, is_amt, role) for one shape; role names the rows ratios refer to."""
    arch = ARCH[name]
    precision = "fp16" if half else "fp32"
    return [
        (f"stock masked_lm {name} {precision}",
         ["--task", "masked_lm", "--criterion", "masked_lm", "--optimizer", "adam",
          *stock_shape, *half], False, "baseline"),
        (f"AMT {arch} {precision}",
         [*amt, "--arch", arch, *half, *(["--fp16-no-flatten-grads"] if half else [])],
         True, ""),
        (f"AMT {arch} bf16", [*amt, "--arch", arch, "--bf16-autocast"], True, "with masker"),
        (f"AMT {arch} bf16 compiled",
         [*amt, "--arch", arch, "--bf16-autocast", "--torch-compile"], True, ""),
        (f"AMT {arch} bf16, random masking (no masker)",
         [*amt, "--arch", arch, "--bf16-autocast", "--masking-strategy", "random"],
         False, "without masker"),
    ]


def benchmark(args, data: Path, cpu: bool) -> list[dict]:
    common = ["--tokens-per-sample", str(args.tokens), "--batch-size", str(args.batch),
              "--lr", "1e-4", "--weight-decay", "0.01", "--adam-betas", "(0.9,0.98)"]
    amt = ["--user-dir", str(ROOT / "amt_plugin"), "--task", "adversarial_masked_lm",
           "--criterion", "adversarial_masked_lm", "--optimizer", "amt_adam",
           "--masker-warmup-updates", "0"]
    half = [] if cpu else ["--fp16"]
    rows = []
    for name in args.shapes.split(","):
        shape = SHAPES[name]
        layers, d, heads, ffn = shape[:4]
        stock_shape = ["--arch", "roberta", "--encoder-layers", str(layers),
                       "--encoder-embed-dim", str(d), "--encoder-attention-heads",
                       str(heads), "--encoder-ffn-embed-dim", str(ffn)]
        updates = args.updates * (2 if name == "small" else 1)  # fast steps: more of them
        base = None
        shape_rows = []
        for label, flags, is_amt, role in runs_for(name, half, amt, stock_shape):
            row = {"run": label, "shape": name, "role": role, "updates": updates}
            try:
                wps, mem = throughput(data, common + flags, updates, cpu, args.run_timeout)
            except RuntimeError as e:
                row["error"] = str(e).strip().splitlines()[-1][:160] if str(e).strip() else "?"
                print(f"FAILED {label}:\n{e}", file=sys.stderr, flush=True)
            else:
                base = wps if role == "baseline" else base
                flops = flops_per_token(shape, args.vocab, args.tokens, is_amt, True)
                row.update(tokens_per_s=wps, peak_gib=mem,
                           ratio=wps / base if base else None,
                           mfu=wps * flops / (args.peak_tflops * 1e12))
                print(f"measured {label}: {wps:,.0f} tokens/s", file=sys.stderr, flush=True)
            shape_rows.append(row)
            if args.json:  # as we go: a run cut short still leaves what it measured
                args.json.write_text(json.dumps({"throughput": rows + shape_rows}, indent=1))
        by_role = {r["role"]: r.get("tokens_per_s") for r in shape_rows}
        if by_role.get("with masker") and by_role.get("without masker"):
            share = 1 - by_role["with masker"] / by_role["without masker"]
            for r in shape_rows:
                if r["role"] == "with masker":
                    r["masker_share"] = share
        rows += shape_rows
    return rows


def print_table(rows: list[dict], header: str) -> None:
    print(f"\n{header}\n")
    print("| run | tokens/s | ratio to stock (same shape) | peak memory (GiB) | MFU |")
    print("|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['run']} | failed: {r['error']} | | | |")
            continue
        ratio = f"{r['ratio']:.2f}x" if r.get("ratio") else "n/a"
        print(f"| {r['run']} | {r['tokens_per_s']:,.0f} | {ratio} | {r['peak_gib']:.1f} | "
              f"{100 * r['mfu']:.1f}% |")
    for r in rows:
        if "masker_share" in r:
            print(f"\nmasker's share of step time, {r['shape']} shape, bf16: "
                  f"{100 * r['masker_share']:.1f}%")


def numerics(args, data: Path, cpu: bool) -> dict:
    """fp32 against bf16 on the same data and seed, in bits.

    Under random masking both runs see the same masks, so their train losses differ only by
    precision. Under learned masking the two maskers soon choose differently and their train
    losses are losses on different masks; the comparable curve there is the fixed-mask
    validation loss (`fixed_mask_loss`), at five points.
    """
    updates = args.numerics_updates
    flags = ["--user-dir", str(ROOT / "amt_plugin"), "--task", "adversarial_masked_lm",
             "--criterion", "adversarial_masked_lm", "--optimizer", "amt_adam",
             "--arch", args.numerics_arch,
             "--tokens-per-sample", str(args.tokens), "--batch-size", str(args.batch),
             "--lr", "5e-4", "--warmup-updates", str(max(1, updates // 10)),
             "--lr-scheduler", "polynomial_decay", "--total-num-update", str(updates),
             "--masker-lr", "1e-3", "--masker-warmup-updates", str(updates // 4),
             "--dropout", "0", "--attention-dropout", "0", "--max-update", str(updates),
             "--no-save", "--log-interval", str(max(1, updates // 20)),
             "--validate-interval-updates", str(max(1, updates // 5)),
             "--validate-interval", "1000"]
    result = {}
    for strategy, key, kind in (("random", "loss", "train_inner"),
                                ("learned", "fixed_mask_loss", "valid")):
        curves = {}
        for precision, extra in (("fp32", []), ("bf16", ["--bf16-autocast"])):
            out = train(data, [*flags, "--masking-strategy", strategy, *extra], cpu,
                        args.run_timeout)
            curves[precision] = dict(parse_log(out, kind, key))
        steps = sorted(set(curves["fp32"]) & set(curves["bf16"]))
        gaps = [abs(curves["fp32"][u] - curves["bf16"][u]) for u in steps]
        result[strategy] = {
            "metric": f"{kind} {key}", "updates": steps,
            "fp32": [curves["fp32"][u] for u in steps],
            "bf16": [curves["bf16"][u] for u in steps],
            "max_gap": max(gaps) if gaps else None, "final_gap": gaps[-1] if gaps else None}
    return result


def parse_log(out: str, kind: str, key: str) -> list[tuple[int, float]]:
    """(num_updates, value of key) from fairseq's simple-format lines of one kind."""
    pairs = []
    for line in out.splitlines():
        if f"| {kind} |" not in line:
            continue
        value = re.search(rf"(?<!\w){key}[ =]([\d.]+)", line)
        update = re.search(r"num_updates[ =](\d+)", line)
        if value and update:
            pairs.append((int(update.group(1)), float(value.group(1))))
    return pairs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--updates", type=int,
                   help="updates per run at base shape, twice as many at small shape "
                   "(default 120; smoke 6)")
    p.add_argument("--batch", type=int, help="sequences per update (default 64; smoke 4)")
    p.add_argument("--tokens", type=int, help="tokens per sequence (default 512; smoke 64)")
    p.add_argument("--vocab", type=int, help="corpus vocabulary (default 30000; smoke 500)")
    p.add_argument("--peak-tflops", type=float, default=989.0)
    p.add_argument("--shapes", default="base,small")
    p.add_argument("--run-timeout", type=int, default=300, help="seconds per run")
    p.add_argument("--numerics", action="store_true",
                   help="also train fp32 against bf16 and compare the loss curves")
    p.add_argument("--numerics-only", action="store_true")
    p.add_argument("--numerics-updates", type=int, help="default 300; smoke 8")
    p.add_argument("--numerics-arch", help="default amt_small; smoke amt_tiny")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--smoke", action="store_true",
                   help="CPU, tiny shape, small defaults (a check that the script runs)")
    args = p.parse_args(argv)
    cpu = args.smoke
    defaults = dict(updates=6, batch=4, tokens=64, vocab=500, numerics_updates=8,
                    numerics_arch="amt_tiny") if cpu else \
        dict(updates=120, batch=64, tokens=512, vocab=30000, numerics_updates=300,
             numerics_arch="amt_small")
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if cpu:
        args.shapes = "tiny"
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        lines = 2000 if args.smoke else 40000
        data = make_corpus(Path(tmp), args.vocab, lines, max(10, lines // 100), (50, 400),
                           workers=os.cpu_count() or 1)
        if not args.numerics_only:
            results["throughput"] = benchmark(args, data, cpu)
            device = "CPU (smoke: tiny shapes)" if cpu else "GPU"
            print_table(results["throughput"], f"{device}, {args.batch} x {args.tokens} tokens "
                        f"per update, {args.updates} updates per run (small shape: twice)")
        if args.numerics or args.numerics_only:
            results["numerics"] = numerics(args, data, cpu)
            arch = args.numerics_arch
            for strategy, n in results["numerics"].items():
                print(f"\nbf16 against fp32, {arch}, {strategy} masking, {args.numerics_updates} "
                      f"updates, same data and seed: {n['metric']} (bits)\n")
                print("| update | fp32 | bf16 |\n|---|---|---|")
                for u, a, b in zip(n["updates"], n["fp32"], n["bf16"]):
                    print(f"| {u} | {a:.3f} | {b:.3f} |")
                if n["max_gap"] is not None:
                    print(f"\nlargest gap {n['max_gap']:.3f} bits, at the end "
                          f"{n['final_gap']:.3f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    failed = [r["run"] for r in results.get("throughput", []) if "error" in r]
    return 1 if failed and args.smoke else 0


if __name__ == "__main__":
    sys.exit(main())
