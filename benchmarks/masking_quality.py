"""Masking strategies compared past the unigram plateau, and which yardsticks can tell.

    .venv/bin/python benchmarks/masking_quality.py [--quick] [--out runs/quality]
        [--corpus ptb|wikitext-2|DIR] [--config amt_tiny] [--updates N] [--seeds 3]
        [--strategies random,frequency,span,learned] [--glue-dir DIR --glue CoLA,SST-2]
        [--blimp-dir DIR] [--sensitivity] [-- key=value ...]

Each run pretrains the same predictor (configs/CONFIG.yaml, the config's own recipe) with one
masking strategy and one seed, then scores it on every yardstick:
- the fixed-mask loss and accuracy on valid and test, overall and per frequency bucket, beside
  the context-free reference (the training split's unigram model on the same positions);
- BLiMP, zero-shot, by PLL-word-l2r (the shipped subset, or --blimp-dir);
- fine-tuning: the offline proxy tasks SHUF and NEXT, or real GLUE tasks with --glue-dir
  (one fine-tuning seed per pretrained model; the spread comes from the pretraining seeds).

The table gives, per strategy, the median over seeds and [min, max], the tokens/s of
pretraining, and whether the masker collapsed.

--sensitivity: instead of strategies, three predictors of the same shape per seed (random
masking): the control (randomly initialised, untrained), a checkpoint still on the plateau
(--plateau-update, default a tenth of the updates), and the trained one. A metric can judge
masking strategies in this setting only if its gap between plateau and trained is well outside
the seed spread; the table says for each metric whether it is.

Results are cached per run under --out, so an interrupted benchmark continues where it was.
--quick: 1 seed, 300 updates, the proxy tasks skipped: minutes, for checking the harness.
"""

from __future__ import annotations

import argparse
import hashlib
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

import evaluate_blimp  # noqa: E402
import glue  # noqa: E402
import pipeline  # noqa: E402
from evaluate_checkpoint import evaluate  # noqa: E402
from export_roberta import export, random_init  # noqa: E402

from amt_plugin import logs  # noqa: E402

STRATEGIES = ("random", "frequency", "span", "learned")
BUCKETS = ("", "_top100", "_next900", "_rest")
PREDICTORS = ("control", "plateau", "trained")


def prepare_data(out: Path, corpus: str, vocab_size: int) -> argparse.Namespace:
    args = pipeline.parse_args(["--out", str(out / "data"), "--corpus", corpus, "--cpu",
                                "--vocab-size", str(vocab_size)])
    pipeline.check_inputs(args)
    args.text = pipeline.stage_corpus(args)
    args.bpe = pipeline.stage_bpe(args, args.text)
    args.data = pipeline.stage_binarize(args, args.bpe)
    return args


def pretrain(data: Path, work: Path, config: str, strategy: str, seed: int, updates: int,
             plateau: int, overrides: list[str]) -> tuple[Path, Path]:
    """(final checkpoint, the checkpoint at update `plateau`); validation at every save."""
    ckpts = work / "checkpoints"
    final, early = ckpts / "checkpoint_last.pt", ckpts / f"checkpoint_plateau_{plateau}.pt"
    if (work / "train.done").is_file():
        return final, early
    work.mkdir(parents=True, exist_ok=True)
    cmd = ["fairseq-hydra-train", "--config-dir", str(ROOT / "configs"), "--config-name",
           config, f"task.data={data}", f"common.user_dir={ROOT / 'amt_plugin'}",
           "common.cpu=true", f"task.masking_strategy={strategy}", f"common.seed={seed}",
           f"optimization.max_update={updates}", f"checkpoint.save_dir={ckpts}",
           f"checkpoint.save_interval_updates={plateau}", "checkpoint.keep_interval_updates=-1",
           f"hydra.run.dir={work / 'hydra'}", *overrides]
    with open(work / "train.log", "w") as log:
        subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=True)
    for ckpt in list(ckpts.glob("checkpoint_*_*.pt")):  # keep the plateau one, no other
        if ckpt.stem.endswith(f"_{plateau}") and not early.exists():
            ckpt.rename(early)
        elif ckpt != early:
            ckpt.unlink()
    (work / "train.done").write_text("")
    return final, early


def train_stats(log: Path) -> dict[str, float]:
    """Median tokens/s after the first window, and the final masker diagnostics."""
    inner = logs.read(log, "train_inner")
    if not inner:
        return {}
    stats = {"wps": statistics.median(x["wps"] for x in inner[1:] or inner)}
    last = inner[-1]
    if "masker_distinct_types" in last:
        stats["collapsed"] = float(last["masker_entropy"] < 1.0
                                   or last["masker_distinct_types"] < 0.2)
    return stats


def score(prepared, checkpoint: Path, work: Path, tasks: list[glue.Task], seed: int,
          blimp_dir: Path | None, normalise: str, glue_args: argparse.Namespace) -> dict:
    """Every yardstick for one checkpoint."""
    result = {}
    for subset in ("valid", "test"):
        metrics = evaluate(checkpoint, prepared.data, subset)
        result.update({f"{subset}_{k}": v for k, v in metrics.items()
                       if k.startswith("fixed_mask")})
    exported = work / "roberta"
    export(checkpoint, exported, prepared.data)
    blimp = evaluate_blimp.evaluate(exported / "model.pt", prepared.bpe, blimp_dir,
                                    style=normalise)
    result["blimp"] = blimp["accuracy"]
    result.update({f"blimp_{f}": a for f, a in blimp["fields"].items()})
    shape = (exported / "roberta_args.txt").read_text().split()
    glue_dir = glue_args.glue_dir or prepared.out / "glue_data"
    for task in tasks:
        if task.name in glue.PROXY_TASKS and not (glue_dir / task.name / "dev.tsv").is_file():
            glue.make_proxy_tasks(pipeline.held_out_sentences(prepared.text), glue_dir)
        task_bin = prepared.out / "glue_bin" / task.name
        if not (task_bin / "input0" / "dict.txt").is_file():
            glue.prepare(task, glue_dir, prepared.bpe, prepared.data / "dict.txt", task_bin)
        log = subprocess.run(
            glue.finetune_command(task, task_bin, exported / "model.pt", shape, seed,
                                  work / "glue", glue_args.glue_update_scale, glue_args.glue_lr),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=True).stdout
        for m, v in glue.best_scores(task, log).items():
            result[f"{task.name}_{m}"] = v
    return result


def cached(path: Path, compute, *args) -> dict:
    """compute(*args), or what an earlier call saved in path."""
    if path.is_file():
        return json.loads(path.read_text())
    value = compute(*args)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=1))
    return value


# --- tables ------------------------------------------------------------------------------------

def spread(values: list[float], fmt: str) -> str:
    if len(values) == 1:
        return fmt.format(values[0])
    return (fmt.format(statistics.median(values)) + " [" + fmt.format(min(values)) + ", "
            + fmt.format(max(values)) + "]")


def metric_keys(runs: list[dict], split: str) -> list[str]:
    keys = [f"{split}_fixed_mask_{m}{b}" for m in ("loss", "below_ref", "acc") for b in BUCKETS]
    keys += sorted({k for r in runs for k in r if k.startswith("blimp")})
    keys += sorted({k for r in runs for k in r if re.match(r"[A-Z]", k)})
    return [k for k in keys if any(k in r for r in runs)]


def fmt_of(key: str) -> str:
    return "{:.1f}" if key.startswith("blimp") or re.match(r"[A-Z]", key) else "{:.3f}"


def quality_table(results: dict[str, list[dict]], split: str) -> str:
    runs = [r for rs in results.values() for r in rs]
    keys = metric_keys(runs, split)
    head = ["strategy", *[k.replace(f"{split}_fixed_mask_", "") for k in keys], "tokens/s",
            "collapsed"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    # the reference is the same for every run: the same positions, the same unigram model
    refs = [runs[0].get(k.replace("_loss", "_ref_loss"))
            if k.startswith(f"{split}_fixed_mask_loss") else None for k in keys]
    lines.append("| context-free reference | " + " | ".join(
        "" if r is None else f"{r:.3f}" for r in refs) + " | | |")
    for strategy, rs in results.items():
        row = [strategy] + [spread([r[k] for r in rs if k in r], fmt_of(k))
                            if any(k in r for r in rs) else "-" for k in keys]
        wps = [r["wps"] for r in rs if "wps" in r]
        row.append(f"{statistics.median(wps):,.0f}" if wps else "-")
        flags = [r["collapsed"] for r in rs if "collapsed" in r]
        row.append(("yes" if any(flags) else "no") if flags else "-")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def sensitivity_table(by_predictor: dict[str, list[dict]], split: str) -> str:
    keys = metric_keys([r for rs in by_predictor.values() for r in rs], split)
    lines = ["| metric | " + " | ".join(PREDICTORS) + " | trained - plateau | "
             "outside the spread? |", "|---" * (len(PREDICTORS) + 3) + "|"]
    for k in keys:
        vals = {p: [r[k] for r in by_predictor[p] if k in r] for p in PREDICTORS}
        if not all(vals.values()):
            continue
        gap = statistics.median(vals["trained"]) - statistics.median(vals["plateau"])
        width = max(max(v) - min(v) for v in (vals["trained"], vals["plateau"]))
        apart = min(vals["trained"]) > max(vals["plateau"]) or \
            max(vals["trained"]) < min(vals["plateau"])
        verdict = "yes" if apart and abs(gap) > 2 * width else "no"
        lines.append(f"| {k.replace(f'{split}_', '')} | " + " | ".join(
            spread(vals[p], fmt_of(k)) for p in PREDICTORS) + f" | {gap:+.3f} (spread "
            f"{width:.3f}) | {verdict} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    overrides = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "quality")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--corpus", default="ptb")
    parser.add_argument("--config", default="amt_tiny")
    parser.add_argument("--vocab-size", type=int, default=8000, help="SentencePiece pieces")
    parser.add_argument("--seeds", type=int)
    parser.add_argument("--updates", type=int, help="default: the config's max_update")
    parser.add_argument("--plateau-update", type=int)
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--sensitivity", action="store_true")
    parser.add_argument("--glue", help="fine-tuning tasks, or none (default SHUF,NEXT; with "
                        "--glue-dir: CoLA,SST-2)")
    parser.add_argument("--glue-dir", type=Path)
    parser.add_argument("--glue-update-scale", type=float, default=0.1)
    parser.add_argument("--glue-lr", type=float, default=3e-4)
    parser.add_argument("--blimp-dir", type=Path)
    parser.add_argument("--split", default="test", choices=("valid", "test"),
                        help="the split the table reports (choose recipes on valid)")
    args = parser.parse_args(argv)
    args.out = args.out.resolve()  # fairseq-hydra-train runs in a directory of its own
    import yaml

    config = yaml.safe_load((ROOT / "configs" / f"{args.config}.yaml").read_text())
    config_updates = config["optimization"]["max_update"]
    seeds = args.seeds or (1 if args.quick else 3)
    updates = args.updates or (300 if args.quick else config_updates)
    plateau = args.plateau_update or max(1, updates // 10)
    names = args.glue or ("CoLA,SST-2" if args.glue_dir else "SHUF,NEXT")
    tasks = [] if args.quick or names == "none" else glue.parse_tasks(names)
    if args.glue_dir:
        for t in tasks:
            glue.check_task_dir(t, args.glue_dir.resolve())
        args.glue_dir = args.glue_dir.resolve()
    prepared = prepare_data(args.out, args.corpus, args.vocab_size)
    normalise = pipeline.blimp_normalisation(
        argparse.Namespace(blimp_normalise="auto", corpus=prepared.corpus))
    # one directory per setting; the overrides (hashed: hydra's grammar allows no '=' in a
    # path it is given) are written beside the runs
    tag = f"{args.config}_u{updates}_{args.corpus.rstrip('/').split('/')[-1]}"
    if overrides:
        tag += "_" + hashlib.sha1(" ".join(overrides).encode()).hexdigest()[:8]
    # the masker starts at the same fraction of a shorter or longer run (explicit overrides win)
    warmup = config.get("criterion", {}).get("masker_warmup_updates")
    if warmup and updates != config_updates and not any(
            o.startswith("criterion.masker_warmup_updates=") for o in overrides):
        overrides = [*overrides, "criterion.masker_warmup_updates="
                     f"{round(warmup * updates / config_updates)}"]
    (args.out / tag).mkdir(parents=True, exist_ok=True)
    (args.out / tag / "overrides.txt").write_text(" ".join(overrides) + "\n")
    strategies = ["random"] if args.sensitivity else args.strategies.split(",")
    results: dict[str, list[dict]] = {}
    by_predictor: dict[str, list[dict]] = {p: [] for p in PREDICTORS}
    for strategy in strategies:
        for seed in range(1, seeds + 1):
            work = args.out / tag / f"{strategy}_s{seed}"
            print(f"== {strategy}, seed {seed}: {updates} updates", flush=True)
            final, early = pretrain(prepared.data, work, args.config, strategy, seed, updates,
                                    plateau, overrides)
            stats = train_stats(work / "train.log")

            common = (tasks, seed, args.blimp_dir, normalise, args)
            trained = cached(work / "trained.json", score, prepared, final, work / "trained",
                             *common)
            results.setdefault(strategy, []).append({**trained, **stats})
            if args.sensitivity:
                by_predictor["trained"].append(trained)
                by_predictor["plateau"].append(cached(
                    work / "plateau.json", score, prepared, early, work / "plateau", *common))
                control = work / "control" / "checkpoint.pt"
                if not (work / "control.json").is_file():
                    random_init(final, control, prepared.data, seed)
                by_predictor["control"].append(cached(
                    work / "control.json", score, prepared, control, work / "control", *common))
    note = (f"\n{args.corpus}, {args.config}, {updates} updates, {seeds} seed(s), split "
            f"{args.split}; median [min, max] over seeds. Fixed-mask loss in bits (below_ref: "
            f"bits below the context-free reference); BLiMP in % ({normalise} normalisation); "
            f"fine-tuning: {', '.join(t.name for t in tasks) or 'none'}, best dev round, one "
            f"fine-tuning seed per model.")
    if args.sensitivity:
        text = sensitivity_table(by_predictor, args.split)
        note += (f" Plateau: the checkpoint at update {plateau}. 'Outside the spread': the "
                 "plateau and trained ranges do not overlap and the gap is more than twice "
                 "the wider range.")
    else:
        text = quality_table(results, args.split)
    (args.out / tag / ("sensitivity.md" if args.sensitivity else "quality.md")).write_text(
        text + "\n" + note + "\n")
    print(text + "\n" + note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
