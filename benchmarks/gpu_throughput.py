"""Throughput of AMT against stock fairseq masked_lm on one GPU: tokens/s, peak memory, MFU;
and whether bf16 training tracks fp32.

    python benchmarks/gpu_throughput.py [--updates 120] [--batch 64] [--tokens 512]
    python benchmarks/gpu_throughput.py --numerics [--numerics-updates 300]
    python benchmarks/gpu_throughput.py --numerics-only --numerics-compare cudagraphs
    python benchmarks/gpu_throughput.py --smoke      # CPU, tiny shapes: checks the script runs
    python benchmarks/gpu_throughput.py --shapes small --tokens 128 --batch 128 \
        --sample-break-mode complete                 # batched as configs/amt_small.yaml is

Every run is the real `python -m fairseq_cli.train` on the same synthetic Zipf corpus (30k-word
vocabulary, made here), one after another in this script, so ratios compare like with like.
Per shape (base = RoBERTa-base, small = amt_small's 12 x 256):

  stock masked_lm --fp16 (the baseline) | AMT --fp16 | AMT bf16 (--bf16-autocast)
  | AMT bf16 with --sync-grad-norm (the host waits for each update's backward, as in
  fairseq; by default the norm is read one update late)
  | AMT --bf16-weights (bf16 weights and activations) | each of the two bf16 with
  --torch-compile, and with --torch-compile-mode reduce-overhead (CUDA graphs)
  | AMT bf16 with --masking-strategy random (the same run without the masker's work)

Runs go in order of what they decide (PRIORITY): the stock rows; AMT with bf16 weights (the
configs' precision) at both shapes (eager, quick to start), and at small shape, which the host
bounds, the same under CUDA graphs and compiled without them; AMT bf16 autocast; at base,
bf16 weights compiled; the other precision and compile variants; the random-masking rows
(the masker's share); a profile of AMT bf16 weights at small and at base shape
(benchmarks/step_profile.py: where the step's time goes, and how long the GPU waits for the
host); the --fp16 rows; then the curves of --numerics (bf16 against fp32). With
--time-budget the script starts no run it has no time left for and reports those rows as
skipped, so one short session on a GPU machine gets the decisive numbers first. Each row is
printed as it is measured and written to --json.

tokens/s is fairseq's `wps`, median over the logging windows after the first third; the
train loss of the last window is the check that a faster row still trains the same model: the
AMT rows with learned masking see the same data, seed and masker schedule, so their losses
differ only as far as precision, kernels and the masks those steer apart; a row whose loss
strays far from the eager bf16-weights row's computes something else (the stock and
random-masking rows mask at random: their loss is not comparable with learned masking's); peak
memory is torch.cuda.max_memory_allocated; MFU = tokens/s x training FLOPs per token / the
card's dense bf16 peak (--peak-tflops, default 989: H100 SXM's data sheet); the next column
divides by the dense bf16 rate a large matmul reaches on the card (--matmul-tflops, default
790, measured on an H100 SXM), the ceiling in practice. FLOPs per token count the
predictor (6 x dense weights, attention, the LM head on the masked 15%) and, for AMT, the
masker (forward on every update, backward when it trains). The masker's share of step time is
1 - (tokens/s with the masker) / (tokens/s without it). A run that fails is reported as such
and the others go on.

--numerics trains amt_small in fp32 and in bf16 (--bf16-weights, the configs' precision, or
--bf16-autocast with --numerics-bf16 autocast) on the same data and seed (dropout off; the
Zipf corpus, or with --numerics-data a binarized real one, such as run.sh's), under
random masking (train loss: the same masks in both runs) and learned masking (fixed-mask
validation loss), and prints the curves and the largest gap, in bits. With
--numerics-compare cudagraphs the two runs are that bf16 eager and the same under CUDA graphs
(--torch-compile --torch-compile-mode reduce-overhead): whether replaying graphs trains the
same model over a few hundred updates, masker included, not only one step (the unit tests).
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
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from zipf_corpus import make_corpus

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from amt_plugin import logs  # noqa: E402

# fairseq-train in-process, then report the peak GPU memory. fairseq's trainer resets the peak
# after every update (for its gb_free), so the peak is also read just before each reset.
# For --torch-compile runs it also reports, at the end (nothing is logged while it measures
# but recompiles, which are rare unless something is wrong), torch's compile counters: how
# many graphs, recompiles and CUDA-graph skips there were, with torch's performance hints
# (why a graph was not replayed as a CUDA graph).
LAUNCH = """
import json, sys, torch
from fairseq_cli.train import cli_main
peak, reset = [0], torch.cuda.reset_peak_memory_stats
def reset_after_reading(*args, **kwargs):
    peak[0] = max(peak[0], torch.cuda.max_memory_allocated())
    reset(*args, **kwargs)
torch.cuda.reset_peak_memory_stats = reset_after_reading
compiled = "--torch-compile" in sys.argv
if compiled:
    torch._logging.set_logs(recompiles=True, perf_hints=True)
try:
    cli_main()
finally:
    if torch.cuda.is_available():
        print("PEAK_MEMORY_BYTES", max(peak[0], torch.cuda.max_memory_allocated()), flush=True)
    if compiled:
        from torch._dynamo.utils import counters
        print("COMPILE_COUNTERS", json.dumps({k: dict(v) for k, v in counters.items()
                                              if v and k != "aten_mm_info"}, default=str),
              flush=True)
"""
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


def run_python(argv: list[str], timeout: int) -> subprocess.CompletedProcess:
    """This Python on argv with the project on PYTHONPATH. Raises RuntimeError with the
    output's tail if it fails or times out."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    try:
        proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=env,
                              timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"timed out after {timeout} s") from e
    if proc.returncode != 0:
        raise RuntimeError((proc.stdout + proc.stderr)[-3000:])
    return proc


def train(data: Path, flags: list[str], cpu: bool, timeout: int) -> str:
    """One fairseq-train run; its whole log. Raises RuntimeError with the log's tail.

    Each run has its own save directory: fairseq-train writes and deletes a file there at
    start-up even with --no-save, so runs side by side (the numerics) sharing one would race."""
    with tempfile.TemporaryDirectory() as save_dir:
        proc = run_python(["-c", LAUNCH, str(data), "--log-format", "simple",
                           "--no-progress-bar", "--seed", "1", "--num-workers", "2",
                           "--save-dir", save_dir, *(["--cpu"] if cpu else []), *flags],
                          timeout)
    return proc.stdout + proc.stderr


# A number as fairseq's simple log prints it ("{:g}"): from a million on with an exponent,
# e.g. wps=1.10675e+06.
NUMBER = r"\d+(?:\.\d*)?(?:e[+-]?\d+)?"


def throughput(data: Path, flags: list[str], updates: int, cpu: bool, timeout: int):
    """(tokens/s, peak GiB, the train loss of the last logging window, the run's log)."""
    log_every = max(1, updates // 12)
    out = train(data, ["--max-update", str(updates), "--no-save", "--disable-validation",
                       "--log-interval", str(log_every), *flags], cpu, timeout)
    wps, loss = steady_wps(out), parse_log(out, "train_inner", "loss")
    peak = re.findall(r"PEAK_MEMORY_BYTES (\d+)", out)
    return (wps, int(peak[-1]) / 2**30 if peak else float("nan"),
            loss[-1][1] if loss else float("nan"), out)


def steady_wps(out: str) -> float:
    """fairseq's tokens/s in a training log: the median over the logging windows after the
    first third (which hold the start-up and compiling)."""
    wps = [e["wps"] for e in logs.records(out, "train_inner") if isinstance(e.get("wps"), float)]
    if not wps:
        raise RuntimeError("no wps in the log:\n" + out[-2000:])
    return statistics.median(wps[len(wps) // 3:] or wps)


def compile_report(out: str) -> dict:
    """What torch.compile did in a --torch-compile run: its counters (graphs, recompiles,
    CUDA-graph skips), the first recompile reasons and the CUDA-graph hints (skips and
    re-recordings, with their reasons), from the run's log."""
    report = {}
    counters = re.findall(r"^COMPILE_COUNTERS (.*)$", out, flags=re.M)
    if counters:
        report["counters"] = json.loads(counters[-1])
    marker = "[__recompiles]"
    reasons = [line.split(marker, 1)[1].strip()[:200] for line in out.splitlines()
               if marker in line]
    if reasons:
        report["recompiles"] = reasons[:20]
    hints = [line.split("[__perf_hints]", 1)[1].strip()[:300] for line in out.splitlines()
             if "[__perf_hints]" in line and "cudagraph" in line.lower()]
    if hints:
        report["cudagraph_hints"] = list(dict.fromkeys(hints))[:20]
    return report


# Row kinds, in the order the table shows them; PRIORITY is the order they run in.
KINDS = ("baseline", "fp16", "bf16", "synced", "bf16w", "compiled", "bf16w_compiled", "cudagraphs",
         "bf16w_cudagraphs", "random")
# The stock rows first (every ratio needs them); then bf16 weights (the configs' precision:
# amt_adam's fp32 master weights, no casts, half the bytes of autocast; eager, so quick to
# start) at both shapes, and at small shape the same under CUDA graphs and compiled without
# them (the small step is bound by the host's kernel launches); then bf16 autocast, and at
# base the compiled bf16 weights; then the other variants (the --sync-grad-norm row: what
# the sync-free update is worth).
PRIORITY = [("base", "baseline"), ("small", "baseline"),
            ("base", "bf16w"), ("small", "bf16w"), ("small", "bf16w_cudagraphs"),
            ("small", "bf16w_compiled"),
            ("base", "bf16"), ("small", "bf16"), ("base", "bf16w_compiled"),
            ("small", "synced"), ("small", "cudagraphs"), ("base", "compiled"),
            ("small", "compiled"), ("base", "cudagraphs"),
            ("base", "bf16w_cudagraphs"), ("base", "synced"),
            ("base", "random"), ("small", "random"), ("small", "profile"),
            ("base", "profile"), ("base", "fp16"), ("small", "fp16"), "numerics"]


CUDA_GRAPHS = ["--torch-compile", "--torch-compile-mode", "reduce-overhead"]


def row_spec(name: str, kind: str, half: list[str], amt: list[str]) -> tuple[str, list, bool]:
    """(label, flags, is_amt) of one row: `kind` of KINDS at shape `name`."""
    arch = ARCH[name]
    precision = "fp16" if half else "fp32"
    if kind == "baseline":
        layers, d, heads, ffn = SHAPES[name][:4]
        return (f"stock masked_lm {name} {precision}",
                ["--task", "masked_lm", "--criterion", "masked_lm", "--optimizer", "adam",
                 "--arch", "roberta", "--encoder-layers", str(layers),
                 "--encoder-embed-dim", str(d), "--encoder-attention-heads", str(heads),
                 "--encoder-ffn-embed-dim", str(ffn), *half], False)
    bf16 = [*amt, "--arch", arch, "--bf16-autocast"]
    bf16w = [*amt, "--arch", arch, "--bf16-weights"]
    return {
        "fp16": (f"AMT {arch} {precision}",
                 [*amt, "--arch", arch, *half, *(["--fp16-no-flatten-grads"] if half else [])],
                 True),
        "bf16": (f"AMT {arch} bf16", bf16, True),
        "synced": (f"AMT {arch} bf16, gradient norm read in its own update (fairseq's sync)",
                   [*bf16, "--sync-grad-norm"], True),
        "bf16w": (f"AMT {arch} bf16 weights", bf16w, True),
        "compiled": (f"AMT {arch} bf16 compiled", [*bf16, "--torch-compile"], True),
        "bf16w_compiled": (f"AMT {arch} bf16 weights compiled",
                           [*bf16w, "--torch-compile"], True),
        "bf16w_cudagraphs": (f"AMT {arch} bf16 weights compiled, CUDA graphs",
                             [*bf16w, *CUDA_GRAPHS], True),
        "cudagraphs": (f"AMT {arch} bf16 compiled, CUDA graphs", [*bf16, *CUDA_GRAPHS], True),
        "random": (f"AMT {arch} bf16, random masking (no masker)",
                   [*bf16, "--masking-strategy", "random"], False),
    }[kind]


class Clock:
    """The --time-budget: how many seconds a run may still take (None: no budget)."""

    MIN_RUN = 45  # seconds: below this a run would only start up and be killed

    def __init__(self, budget: float | None) -> None:
        self.deadline = None if budget is None else time.monotonic() + budget

    def allowance(self, timeout: int) -> int | None:
        """Timeout for the next run, or None when there is no time left to start one."""
        if self.deadline is None:
            return timeout
        left = int(self.deadline - time.monotonic())
        return min(timeout, left) if left >= self.MIN_RUN else None


def measure(args, data: Path, cpu: bool, name: str, kind: str, clock: Clock) -> dict:
    """One throughput row (an error or skip is recorded in the row, never raised)."""
    common = ["--tokens-per-sample", str(args.tokens), "--batch-size", str(args.batch),
              "--sample-break-mode", args.sample_break_mode,
              "--lr", "1e-4", "--weight-decay", "0.01", "--adam-betas", "(0.9,0.98)"]
    amt = ["--user-dir", str(ROOT / "amt_plugin"), "--task", "adversarial_masked_lm",
           "--criterion", "adversarial_masked_lm", "--optimizer", "amt_adam",
           "--masker-warmup-updates", "0"]
    label, flags, is_amt = row_spec(name, kind, [] if cpu else ["--fp16"], amt)
    if args.sample_break_mode != "none" and "reduce-overhead" in flags:
        flags = [*flags, "--pad-to-multiple", "32"]  # a few batch shapes, a few CUDA graphs
    updates = args.updates * (2 if name == "small" else 1)  # fast steps: more of them
    row = {"run": label, "shape": name, "kind": kind, "updates": updates,
           "flags": common + flags}
    timeout = clock.allowance(args.run_timeout)
    if timeout is None:
        row["error"] = "skipped: no time left in --time-budget"
        return row
    try:
        wps, mem, loss, out = throughput(data, common + flags, updates, cpu, timeout)
    except RuntimeError as e:
        row["error"] = str(e).strip().splitlines()[-1][:160] if str(e).strip() else "?"
        print(f"FAILED {label}:\n{e}", file=sys.stderr, flush=True)
        return row
    if "--torch-compile" in flags:
        row["compile"] = compile_report(out)
        print(f"{label}, torch.compile: {json.dumps(row['compile'])[:2000]}", file=sys.stderr,
              flush=True)
    flops = flops_per_token(SHAPES[name], args.vocab, args.tokens, is_amt, True)
    row.update(tokens_per_s=wps, peak_gib=mem, loss=loss,
               mfu=wps * flops / (args.peak_tflops * 1e12),
               of_matmul_rate=wps * flops / (args.matmul_tflops * 1e12))
    return row


def profile(args, data: Path, cpu: bool, name: str, clock: Clock) -> str:
    """benchmarks/step_profile.py's tables for AMT bf16 weights (the configs' precision) at
    shape `name` (or why not)."""
    timeout = clock.allowance(args.run_timeout)
    if timeout is None:
        return "skipped: no time left in --time-budget"
    sizes = ["--warmup", "2", "--steps", "2"] if cpu else []
    try:
        proc = run_python([str(ROOT / "benchmarks" / "step_profile.py"), "--arch", ARCH[name],
                           "--batch", str(args.batch), "--tokens", str(args.tokens),
                           "--data", str(data), "--bf16-weights", *sizes], timeout)
    except RuntimeError as e:
        print(f"FAILED profile {name}:\n{e}", file=sys.stderr, flush=True)
        return f"failed: {(str(e).strip().splitlines() or ['?'])[-1][:160]}"
    return proc.stdout.strip()


def with_ratios(rows: list[dict]) -> list[dict]:
    """Ratios to the same shape's stock row, and the masker's share of step time."""
    by = {(r["shape"], r["kind"]): r.get("tokens_per_s") for r in rows}
    for r in rows:
        base = by.get((r["shape"], "baseline"))
        r["ratio"] = r["tokens_per_s"] / base if base and "tokens_per_s" in r else None
        plain = by.get((r["shape"], "random"))
        if r["kind"] == "bf16" and "tokens_per_s" in r and plain:
            r["masker_share"] = 1 - r["tokens_per_s"] / plain
    order = {k: i for i, k in enumerate(KINDS)}
    return sorted(rows, key=lambda r: (r["shape"] != "base", order[r["kind"]]))


def run_all(args, data: Path, cpu: bool) -> dict:
    """Every selected row and the numerics, in PRIORITY order, within the time budget."""
    clock = Clock(args.time_budget)
    shapes = ["tiny"] if cpu else args.shapes.split(",")
    kinds = args.rows.split(",")
    if cpu:  # the smoke run: the tiny shape stands in for both
        plan = [("tiny", k) for k in KINDS if k in kinds]
        plan += ["numerics", *([("tiny", "profile")] if args.profile else [])]
    else:
        plan = [job for job in PRIORITY if job == "numerics" or (
            job[0] in shapes and (job[1] in kinds or job[1] == "profile" and args.profile))]
    if args.numerics_only:
        plan = ["numerics"]
    elif not (args.numerics or args.numerics_only):
        plan = [job for job in plan if job != "numerics"]
    results: dict = {"throughput": []}
    for job in plan:
        if job == "numerics":
            results["numerics"] = numerics(args, args.numerics_data or data, cpu, clock)
        elif job[1] == "profile":
            results.setdefault("profiles", {})[job[0]] = profile(args, data, cpu, job[0], clock)
            print(f"profile {job[0]}: done", flush=True)
        else:
            row = measure(args, data, cpu, *job, clock)
            results["throughput"].append(row)
            done = f"{row['tokens_per_s']:,.0f} tokens/s" if "tokens_per_s" in row else \
                row["error"]
            print(f"{row['run']}: {done}", flush=True)
        if args.json:  # as we go: a run cut short still leaves what it measured
            args.json.write_text(json.dumps(results, indent=1))
    results["throughput"] = with_ratios(results["throughput"])
    if not results["throughput"]:
        del results["throughput"]
    return results


def print_table(rows: list[dict], header: str, args) -> None:
    print(f"\n{header}\n")
    print(f"| run | tokens/s | ratio to stock (same shape) | peak memory (GiB) | "
          f"MFU (of {args.peak_tflops:g} TFLOP/s) | of {args.matmul_tflops:g} TFLOP/s | "
          f"train loss at the end (bits) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            status = r["error"] if r["error"].startswith("skipped") else f"failed: {r['error']}"
            print(f"| {r['run']} | {status} | | | | | |")
            continue
        ratio = f"{r['ratio']:.2f}x" if r.get("ratio") else "n/a"
        print(f"| {r['run']} | {r['tokens_per_s']:,.0f} | {ratio} | {r['peak_gib']:.1f} | "
              f"{100 * r['mfu']:.1f}% | {100 * r['of_matmul_rate']:.1f}% | {r['loss']:.3f} |")
    for r in rows:
        if "masker_share" in r:
            print(f"\nmasker's share of step time, {r['shape']} shape, bf16: "
                  f"{100 * r['masker_share']:.1f}%")


def numerics_pair(args) -> tuple[tuple[str, list[str]], tuple[str, list[str]]]:
    """The two runs --numerics compares, as (label, flags): the reference, then the candidate.
    --numerics-compare precision: fp32 against bf16; cudagraphs: bf16 eager against bf16
    under CUDA graphs."""
    bf16 = ["--bf16-weights"] if args.numerics_bf16 == "weights" else ["--bf16-autocast"]
    if args.numerics_compare == "cudagraphs":
        return ("eager", bf16), ("cudagraphs", [*bf16, *CUDA_GRAPHS])
    return ("fp32", []), ("bf16", bf16)


def numerics(args, data: Path, cpu: bool, clock: Clock) -> dict:
    """The reference run against the candidate (numerics_pair) on the same data and seed,
    in bits.

    Under random masking both runs see the same masks, so their train losses differ only by
    precision or kernels. Under learned masking the two maskers soon choose differently and
    their train losses are losses on different masks; the comparable curve there is the
    fixed-mask validation loss (`fixed_mask_loss`), at five points. The four runs are
    independent and time nothing: on a GPU they run side by side.
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
    pair = numerics_pair(args)
    labels = [label for label, _ in pair]
    runs = [(strategy, label, [*flags, "--masking-strategy", strategy, *extra])
            for strategy in ("random", "learned") for label, extra in pair]

    def one(run) -> str | RuntimeError:
        strategy, label, argv = run
        timeout = clock.allowance(args.run_timeout)
        try:
            if timeout is None:
                raise RuntimeError("skipped: no time left in --time-budget")
            out = train(data, argv, cpu, timeout)
        except RuntimeError as e:
            if timeout is not None:  # a skip is reported in the results, not as a failure
                print(f"FAILED numerics {strategy} {label}:\n{e}", file=sys.stderr,
                      flush=True)
            return e
        print(f"numerics, {strategy} masking, {label}: done", flush=True)
        return out

    # The four runs time nothing, so on a GPU, which the host bounds at this size, they run
    # side by side (--numerics-jobs; a quarter of the wall time), on a CPU one after another.
    with ThreadPoolExecutor(max_workers=args.numerics_jobs or (1 if cpu else len(runs))) as pool:
        outs = dict(zip([(strategy, label) for strategy, label, _ in runs],
                        pool.map(one, runs)))
    result = {}
    for strategy, key, kind in (("random", "loss", "train_inner"),
                                ("learned", "fixed_mask_loss", "valid")):
        failed = [(label, outs[strategy, label]) for label in labels
                  if isinstance(outs[strategy, label], RuntimeError)]
        if failed:
            label, e = failed[0]
            result[strategy] = {"metric": f"{kind} {key}", "runs": labels,
                                "error": f"{label}: {str(e).splitlines()[-1][:160]}"}
            continue
        curves = {label: dict(parse_log(outs[strategy, label], kind, key)) for label in labels}
        steps = sorted(set(curves[labels[0]]) & set(curves[labels[1]]))
        gaps = [abs(curves[labels[0]][u] - curves[labels[1]][u]) for u in steps]
        types = re.search(r"dictionary: (\d+) types", outs[strategy, labels[0]])
        result[strategy] = {
            "metric": f"{kind} {key}", "runs": labels, "updates": steps, "corpus": str(data),
            "dictionary_types": int(types.group(1)) if types else None,
            **{label: [curves[label][u] for u in steps] for label in labels},
            "max_gap": max(gaps) if gaps else None, "final_gap": gaps[-1] if gaps else None}
        if "--torch-compile" in pair[1][1]:
            result[strategy]["compile"] = compile_report(outs[strategy, labels[1]])
    return result


def parse_log(out: str, kind: str, key: str) -> list[tuple[int, float]]:
    """(num_updates, value of key) from fairseq's lines of one kind."""
    return logs.series(logs.records(out, kind), key)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--updates", type=int,
                   help="updates per run at base shape, twice as many at small shape "
                   "(default 120; smoke 6)")
    p.add_argument("--batch", type=int, help="sequences per update (default 64; smoke 4)")
    p.add_argument("--tokens", type=int, help="tokens per sequence (default 512; smoke 64)")
    p.add_argument("--vocab", type=int, help="corpus vocabulary (default 30000; smoke 500)")
    p.add_argument("--sample-break-mode", choices=["none", "complete"], default="none",
                   help="none: every sequence a full --tokens block of one line's words "
                   "(one batch shape); complete: whole lines of 5-60 words packed into "
                   "blocks of up to --tokens, as the configs batch (many batch lengths; the "
                   "CUDA-graph rows pad them to multiples of 32; MFU counts full blocks)")
    p.add_argument("--peak-tflops", type=float, default=989.0,
                   help="dense bf16 peak of the card, for MFU (default: H100 SXM)")
    p.add_argument("--matmul-tflops", type=float, default=790.0,
                   help="dense bf16 rate a large matmul reaches on the card")
    p.add_argument("--shapes", default="base,small")
    p.add_argument("--rows", default=",".join(KINDS),
                   help=f"which rows per shape, of {','.join(KINDS)} (default all)")
    p.add_argument("--time-budget", type=float,
                   help="seconds for the whole script: runs that would not fit are skipped "
                   "(most decisive first; see the module docstring)")
    p.add_argument("--run-timeout", type=int, default=300, help="seconds per run")
    p.add_argument("--numerics", action="store_true",
                   help="also train fp32 against bf16 (see --numerics-compare) and compare "
                   "the loss curves")
    p.add_argument("--numerics-only", action="store_true")
    p.add_argument("--numerics-bf16", choices=["autocast", "weights"], default="weights",
                   help="the bf16 run of --numerics: --bf16-autocast or --bf16-weights")
    p.add_argument("--numerics-compare", choices=["precision", "cudagraphs"],
                   default="precision",
                   help="what --numerics compares: fp32 against bf16 (precision), or bf16 "
                   "eager against bf16 under CUDA graphs (cudagraphs)")
    p.add_argument("--profile", action="store_true",
                   help="also profile AMT bf16-weights steps (benchmarks/step_profile.py) per "
                   "shape")
    p.add_argument("--numerics-updates", type=int, help="default 300; smoke 8")
    p.add_argument("--numerics-arch", help="default amt_small; smoke amt_tiny")
    p.add_argument("--numerics-data", type=Path,
                   help="train the numerics on this binarized corpus (fairseq-preprocess's "
                   "output: dict.txt, train and valid) instead of the Zipf corpus, e.g. "
                   "run.sh's runs/default/bin (real text, whose words depend on their context)")
    p.add_argument("--numerics-jobs", type=int,
                   help="numerics runs at once (default: all four on a GPU, one on a CPU)")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--corpus-dir", type=Path,
                   help="make the corpus here and keep it, or reuse the one an earlier run "
                   "made here with the same --vocab (default: a temporary directory)")
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
    unknown = set(args.rows.split(",")) - set(KINDS) or \
        set(args.shapes.split(",")) - {"base", "small"}
    if unknown:
        p.error(f"unknown --rows or --shapes: {', '.join(sorted(unknown))}")
    if args.numerics_data is not None:
        missing = [name for name in ("dict.txt", "train.bin", "train.idx", "valid.bin",
                                     "valid.idx") if not (args.numerics_data / name).is_file()]
        if missing:
            p.error(f"--numerics-data {args.numerics_data} lacks {', '.join(missing)}: give "
                    f"fairseq-preprocess's output directory (e.g. run.sh's runs/default/bin)")
    with tempfile.TemporaryDirectory() as tmp:
        # the same number of words either way: 50-400 per line, or sentence-like 5-60
        sentences = args.sample_break_mode == "complete"
        lines = (2000 if args.smoke else 40000) * (7 if sentences else 1)
        words = (5, 60) if sentences else (50, 400)
        work = (args.corpus_dir or Path(tmp)) / f"zipf-{args.vocab}-{lines}"
        data = work / "bin"
        # --numerics-only on --numerics-data trains on that alone: no Zipf corpus to make
        if not (data / "dict.txt").exists() and not (args.numerics_only and args.numerics_data):
            work.mkdir(parents=True, exist_ok=True)
            data = make_corpus(work, args.vocab, lines, max(10, lines // 100), words,
                               workers=os.cpu_count() or 1)
        results = run_all(args, data, cpu)
    if "throughput" in results:
        device = "CPU (smoke: tiny shapes)" if cpu else "GPU"
        blocks = "" if args.sample_break_mode == "none" else \
            " (at most: whole lines packed, --sample-break-mode complete)"
        print_table(results["throughput"], f"{device}, {args.batch} x {args.tokens} tokens "
                    f"per update{blocks}, {args.updates} updates per run (small shape: "
                    "twice)", args)
    arch = args.numerics_arch
    compared = f"bf16 ({args.numerics_bf16}) against fp32" \
        if args.numerics_compare == "precision" else \
        f"CUDA graphs against eager, both bf16 ({args.numerics_bf16})"
    for strategy, n in results.get("numerics", {}).items():
        print(f"\n{compared}, {arch}, {strategy} masking, {args.numerics_updates} updates, "
              f"same data and seed: {n['metric']} (bits)\n")
        if "error" in n:
            print(f"not measured: {n['error']}")
            continue
        reference, candidate = n["runs"]
        print(f"| update | {reference} | {candidate} |\n|---|---|---|")
        for u, a, b in zip(n["updates"], n[reference], n[candidate]):
            print(f"| {u} | {a:.3f} | {b:.3f} |")
        if n["max_gap"] is not None:
            print(f"\nlargest gap {n['max_gap']:.3f} bits, at the end {n['final_gap']:.3f}")
    for name, text in results.get("profiles", {}).items():
        print(f"\nprofile, AMT bf16 weights at {name} shape (benchmarks/step_profile.py)\n\n{text}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    errors = [r.get("error", "") for r in results.get("throughput", [])]
    errors += [n.get("error", "") for n in results.get("numerics", {}).values()]
    errors += [t for t in results.get("profiles", {}).values() if t.startswith(("failed",
                                                                                "skipped"))]
    failed = [e for e in errors if e and "skipped" not in e]  # skipped: out of --time-budget
    return 1 if failed and args.smoke else 0


if __name__ == "__main__":
    sys.exit(main())
