"""Plots of what the masker learned (PNG, matplotlib).

    python scripts/plot_masking.py rank CHECKPOINT --data BIN --out rank.png
        P(masked | token) against the token's frequency rank: learned vs random vs frequency,
        on the validation data, under the checkpoint's own budget and exploration share.
    python scripts/plot_masking.py training RUN_DIR_OR_LOG [...] --out training.png
        masker entropy and mask_top100_share (with the random-masking reference) over
        training, from fairseq's train log (simple or json format) or TensorBoard event files.
    python scripts/plot_masking.py buckets NAME=metrics.json [...] --out buckets.png
        fixed-mask loss per frequency bucket across runs (JSON from evaluate_checkpoint.py).
    python scripts/plot_masking.py curve [NAME=]train.log [...] --out curve.png
        the learning curve: fixed-mask validation loss against updates, overall and per
        frequency bucket, with the context-free reference (the unigram plateau) as a line.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
logging.getLogger("matplotlib").setLevel(logging.WARNING)  # fairseq's logging lets DEBUG through
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import amt_plugin  # noqa: E402,F401
from amt_plugin import logs, masking  # noqa: E402

# --- rank ---------------------------------------------------------------------------------------


def rank_curves(checkpoint: Path, data: Path, max_batches: int = 50,
                exponent: float = 1.0) -> dict[str, tuple[list[float], list[float]]]:
    """{strategy: (bin centre ranks, P(masked) per bin)} on the valid split."""
    from fairseq import checkpoint_utils

    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task(
        [str(checkpoint)], arg_overrides={"data": str(data)})
    model = models[0].eval()
    d = task.source_dictionary
    specials = torch.tensor(task.special_token_ids())  # madeupword fillers included
    counts = torch.tensor(d.count, dtype=torch.float)
    order = torch.argsort(counts, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order))
    task.load_dataset("valid")
    batches = task.get_batch_iterator(dataset=task.dataset("valid"), max_sentences=32,
                                      max_positions=task.max_positions(),
                                      ignore_invalid_inputs=True).next_epoch_itr(shuffle=False)
    seen = torch.zeros(len(d))
    hits = {s: torch.zeros(len(d)) for s in ("learned", "random", "frequency")}
    g = torch.Generator().manual_seed(0)
    crit = cfg.criterion
    with torch.no_grad():
        for i, sample in enumerate(batches):
            if i == max_batches:
                break
            tokens = sample["net_input"]["src_tokens"]
            logits = model.masker(tokens)

            def draw_masker(available, k, u, logits=logits):
                return masking.gumbel_top_k_from_uniform(logits, available, k,
                                                         crit.masker_temperature, u)

            chosen = {s: masking.choose(
                tokens, specials, cfg.task.mask_prob, s, g, is_word_start=task.is_word_start,
                draw_masker=draw_masker, random_share=crit.masker_random_share,
                counts=counts.long(), frequency_exponent=exponent) for s in hits}
            cand = chosen["random"].candidates
            seen.index_add_(0, tokens[cand], torch.ones(int(cand.sum())))
            for s, c in chosen.items():
                hits[s].index_add_(0, tokens[c.mask], torch.ones(int(c.mask.sum())))
    edges = [0, 10, 30, 100, 300, 1000, 3000, 10000, 30000, 100000]
    curves = {}
    for s, h in hits.items():
        xs, ys = [], []
        for lo, hi in zip(edges[:-1], edges[1:]):
            inside = (rank >= lo) & (rank < hi) & (seen > 0)
            if inside.any():
                xs.append((lo + hi) / 2)
                ys.append(float(h[inside].sum() / seen[inside].sum()))
        curves[s] = (xs, ys)
    return curves


def plot_rank(curves: dict, out: Path, title: str) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for s, (xs, ys) in curves.items():
        ax.plot(xs, ys, marker="o", label=s)
    ax.set_xscale("log")
    ax.set_xlabel("token frequency rank (0 = most frequent), binned")
    ax.set_ylabel("P(masked | token)")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


# --- training curves -------------------------------------------------------------------------

KEYS = ("masker_entropy", "mask_top100_share", "mask_rand_top100_share")


def read_run(path: Path) -> dict[str, list[tuple[int, float]]]:
    """The masker's curves of one run: its TensorBoard train_inner events (a run directory, or
    an event file), else its train.log."""
    if path.is_dir():
        events = sorted(path.glob("**/train_inner/events.out.tfevents.*"))
        if events:
            return logs.scalars(events[-1], KEYS)
        found = sorted(path.glob("**/train.log"))
        if not found:
            raise SystemExit(f"{path}: no train_inner TensorBoard events and no train.log")
        path = found[-1]
    if path.name.startswith("events.out.tfevents"):
        return logs.scalars(path, KEYS)
    inner = logs.read(path, "train_inner")
    return {k: logs.series(inner, k) for k in KEYS}


def plot_training(runs: dict[str, dict], out: Path) -> None:
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for name, s in runs.items():
        if s["masker_entropy"]:
            a.plot(*zip(*s["masker_entropy"]), label=name)
        if s["mask_top100_share"]:
            line, = b.plot(*zip(*s["mask_top100_share"]), label=f"{name}")
            if s["mask_rand_top100_share"]:
                b.plot(*zip(*s["mask_rand_top100_share"]), linestyle="--",
                       color=line.get_color(), label=f"{name}: random masking")
    a.set(title="masker entropy", xlabel="update", ylabel="nats")
    b.set(title="masked tokens among the 100 most frequent types", xlabel="update",
          ylabel="share")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


# --- curve -------------------------------------------------------------------------------------

CURVE_PANELS = (("all tokens", ""), ("the 100 most frequent types", "_top100"),
                ("the next 900", "_next900"), ("the rest", "_rest"))


def read_valid_log(path: Path) -> list[dict[str, float]]:
    """fairseq's validation lines on the valid subset (simple or json format), in order."""
    return [e for e in logs.read(path, "valid") if "fixed_mask_loss" in e and "num_updates" in e]


def plot_curve(runs: dict[str, list[dict]], out: Path) -> None:
    fig, axes = plt.subplots(1, 4, figsize=(16, 4))
    for ax, (title, suffix) in zip(axes, CURVE_PANELS):
        ref = None
        for name, entries in runs.items():
            # the last validation per update; empty buckets log no loss
            points = sorted({int(e["num_updates"]): e for e in entries
                             if f"fixed_mask_loss{suffix}" in e}.items())
            ax.plot([u for u, _ in points], [e[f"fixed_mask_loss{suffix}"] for _, e in points],
                    marker=".", label=name)
            ref = ref or next((e.get(f"fixed_mask_ref_loss{suffix}") for _, e in points), None)
        if ref is not None:
            ax.axhline(ref, color="black", linestyle="--", label="context-free reference")
        ax.set(title=title, xlabel="update", ylabel="fixed-mask loss, valid (bits)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


# --- buckets -----------------------------------------------------------------------------------

BUCKETS = ("top100", "next900", "rest")


def plot_buckets(results: dict[str, dict], out: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 4.5))
    names = list(results)
    width = 0.8 / max(len(names), 1)
    labels = ["all", *BUCKETS]
    for i, name in enumerate(names):
        r = results[name]
        values = [r.get("fixed_mask_loss", float("nan"))] + [
            r.get(f"fixed_mask_loss_{b}", float("nan")) for b in BUCKETS]
        ax.bar([j + i * width for j in range(len(labels))], values, width, label=name)
    ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(labels))], labels)
    ax.set_ylabel("fixed-mask loss (bits)")
    ax.set_title("predictor loss on the fixed 15% mask, by token frequency")
    ax.legend()
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("rank")
    r.add_argument("checkpoint", type=Path)
    r.add_argument("--data", type=Path, required=True)
    r.add_argument("--exponent", type=float, default=1.0, help="of the frequency baseline")
    r.add_argument("--out", type=Path, default=Path("rank.png"))
    t = sub.add_parser("training")
    t.add_argument("runs", nargs="+", help="[NAME=]run dir, train.log or event file")
    t.add_argument("--out", type=Path, default=Path("training.png"))
    b = sub.add_parser("buckets")
    b.add_argument("results", nargs="+", help="NAME=metrics.json")
    b.add_argument("--out", type=Path, default=Path("buckets.png"))
    c = sub.add_parser("curve")
    c.add_argument("logs", nargs="+", help="[NAME=]train.log of fairseq-(hydra-)train")
    c.add_argument("--out", type=Path, default=Path("curve.png"))
    args = parser.parse_args(argv)
    if args.command == "curve":
        curves = {}
        for spec in args.logs:
            name, _, path = spec.rpartition("=")
            entries = read_valid_log(Path(path))
            if not entries:
                raise SystemExit(f"{path}: no validation lines with fixed_mask_loss")
            curves[name or Path(path).parent.name] = entries
        plot_curve(curves, args.out)
    elif args.command == "rank":
        plot_rank(rank_curves(args.checkpoint, args.data, exponent=args.exponent), args.out,
                  str(args.checkpoint))
    elif args.command == "training":
        runs = {}
        for spec in args.runs:
            name, _, path = spec.rpartition("=")
            runs[name or Path(path).name] = read_run(Path(path))
        plot_training(runs, args.out)
    else:
        results = {}
        for spec in args.results:
            name, _, path = spec.rpartition("=")
            results[name or Path(path).stem] = json.loads(Path(path).read_text())
        plot_buckets(results, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
