"""Learned masking against simple baselines at equal compute: the experiment behind AMT.

    .venv/bin/python benchmarks/masking_quality.py [--quick] [--out runs/quality]

On the embedded default corpus (PTB, SentencePiece 8k), pretrain the same predictor
(configs/amt_tiny.yaml) with `random`, `frequency`, `span` and `learned` masking, same budget,
same number of updates, several seeds; then score each on the comparable yardstick (the fixed
15% mask, overall and per frequency bucket), fine-tune on the offline proxy tasks SHUF and NEXT,
and print one table: median over seeds, [min, max] in brackets. Also tokens/s per strategy
and whether the masker collapsed (final entropy < 1 nat or < 20% distinct types among picks).

Default size: 4 strategies x 3 seeds x 600 updates, about an hour on 2 CPU cores.
--quick: 1 seed, 150 updates, no fine-tuning: a few minutes. Results are cached per run under
--out, so an interrupted run continues.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
# fairseq's console scripts live beside this interpreter (.venv/bin)
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"

import glue  # noqa: E402
import pipeline  # noqa: E402
from evaluate_checkpoint import evaluate  # noqa: E402

STRATEGIES = ("random", "frequency", "span", "learned")
BUCKETS = ("top100", "next900", "rest")


def prepare_data(out: Path) -> tuple[Path, Path]:
    args = pipeline.parse_args(["--out", str(out / "data"), "--cpu"])
    text = pipeline.stage_corpus(args)
    bpe = pipeline.stage_bpe(args, text)
    return bpe, pipeline.stage_binarize(args, bpe)


def pretrain(data: Path, work: Path, strategy: str, seed: int, updates: int) -> Path:
    ckpt = work / "checkpoints" / "checkpoint_last.pt"
    if (work / "train.done").is_file():
        return ckpt
    work.mkdir(parents=True, exist_ok=True)
    cmd = ["fairseq-hydra-train", "--config-dir", str(ROOT / "configs"),
           "--config-name", "amt_tiny", f"task.data={data}",
           f"common.user_dir={ROOT / 'amt_plugin'}", "common.cpu=true",
           f"task.masking_strategy={strategy}", f"common.seed={seed}",
           f"optimization.max_update={updates}",
           f"criterion.masker_warmup_updates={updates // 3}",
           f"lr_scheduler.warmup_updates={max(1, updates // 10)}",
           f"checkpoint.save_dir={work / 'checkpoints'}", "checkpoint.save_interval_updates=0",
           "dataset.disable_validation=true", f"hydra.run.dir={work / 'hydra'}"]
    with open(work / "train.log", "w") as log:
        subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=True)
    (work / "train.done").write_text("")
    return ckpt


def train_stats(log: Path) -> dict[str, float]:
    """Median tokens/s after the first window, and the final masker diagnostics."""
    inner = [dict(re.findall(r"(\w+)=([-\d.e]+)", line))
             for line in log.read_text().splitlines() if "[train_inner]" in line]
    stats = {"wps": statistics.median(float(x["wps"]) for x in inner[1:] or inner)}
    last = inner[-1]
    if "masker_distinct_types" in last:
        stats["collapsed"] = float(float(last["masker_entropy"]) < 1.0
                                   or float(last["masker_distinct_types"]) < 0.2)
    return stats


def downstream(out: Path, bpe: Path, data: Path, checkpoint: Path, work: Path,
               seed: int) -> dict[str, float]:
    from export_roberta import export

    exported = work / "roberta"
    if not (exported / "model.pt").is_file():
        export(checkpoint, exported, data)
    glue_dir = out / "data" / "glue_data"
    if not (glue_dir / "NEXT" / "dev.tsv").is_file():
        glue.make_proxy_tasks(pipeline.held_out_sentences(out / "data" / "text"), glue_dir)
    scores = {}
    shape = (exported / "roberta_args.txt").read_text().split()
    for name in ("SHUF", "NEXT"):
        task = glue.TASKS[name]
        task_bin = out / "data" / "glue_bin" / name
        if not (task_bin / "input0" / "dict.txt").is_file():
            glue.prepare(task, glue_dir, bpe, data / "dict.txt", task_bin)
        log = subprocess.run(
            glue.finetune_command(task, task_bin, exported / "model.pt", shape, seed),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=True).stdout
        best = glue.best_scores(task, log)
        scores[f"{name}_{task.metrics[0]}"] = best[task.metrics[0]]
    return scores


def spread(values: list[float], fmt: str = "{:.3f}") -> str:
    if len(values) == 1:
        return fmt.format(values[0])
    return (fmt.format(statistics.median(values)) + " [" + fmt.format(min(values)) + ", "
            + fmt.format(max(values)) + "]")


def table(results: dict[str, list[dict]]) -> str:
    cols = ["fixed_mask_loss", "fixed_mask_acc"] + [
        f"fixed_mask_{m}_{b}" for b in BUCKETS for m in ("loss", "acc")]
    extra = sorted({k for runs in results.values() for r in runs for k in r
                    if k.startswith(("SHUF", "NEXT"))})
    head = ["strategy", *cols, *extra, "tokens/s", "collapsed"]
    lines = ["| " + " | ".join(h.replace("fixed_mask_", "") for h in head) + " |",
             "|---" * len(head) + "|"]
    for strategy, runs in results.items():
        row = [strategy]
        for c in cols + extra:
            vals = [r[c] for r in runs if c in r]
            row.append(spread(vals, "{:.1f}" if c in extra else "{:.3f}") if vals else "-")
        row.append(f"{statistics.median(r['wps'] for r in runs):,.0f}")
        flags = [r["collapsed"] for r in runs if "collapsed" in r]
        row.append(("yes" if any(flags) else "no") if flags else "-")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "quality")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seeds", type=int)
    parser.add_argument("--updates", type=int)
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--no-downstream", action="store_true")
    args = parser.parse_args(argv)
    seeds = args.seeds or (1 if args.quick else 3)
    updates = args.updates or (150 if args.quick else 600)
    with_downstream = not (args.quick or args.no_downstream)
    bpe, data = prepare_data(args.out)
    results: dict[str, list[dict]] = {}
    for strategy in args.strategies.split(","):
        for seed in range(1, seeds + 1):
            work = args.out / f"{strategy}_u{updates}_s{seed}"
            done = work / "result.json"
            if done.is_file():
                result = json.loads(done.read_text())
            else:
                print(f"== {strategy}, seed {seed}: pretraining {updates} updates", flush=True)
                ckpt = pretrain(data, work, strategy, seed, updates)
                result = evaluate(ckpt, data, "valid")
                result.update(train_stats(work / "train.log"))
                done.write_text(json.dumps(result))
            if with_downstream and not any(k.startswith("SHUF") for k in result):
                print(f"== {strategy}, seed {seed}: fine-tuning on SHUF and NEXT", flush=True)
                result.update(downstream(args.out, bpe, data, work / "checkpoints" /
                                         "checkpoint_last.pt", work, seed))
                done.write_text(json.dumps(result))
            results.setdefault(strategy, []).append(result)
    text = table(results)
    note = (f"\nPTB, amt_tiny, {updates} updates (masker warm-up {updates // 3}), {seeds} "
            f"seed(s); fixed-mask loss in bits on valid, buckets by dictionary frequency rank "
            f"(top100 / next900 / rest); SHUF = MCC, NEXT = F1 (proxy tasks, not GLUE).")
    (args.out / "quality.md").write_text(text + "\n" + note + "\n")
    print(text + "\n" + note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
