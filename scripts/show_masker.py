"""Show which tokens a trained masker would mask: coloured terminal text and an HTML page.

    python scripts/show_masker.py CHECKPOINT --data BIN --bpe-dir BPE [--html out.html] \
        "some text" "more text"            (or text on stdin, one sentence per line)

For each token: the probability that it is masked under the checkpoint's own settings
(budget, exploration share, temperature), estimated from --draws draws of the real selection
code, next to uniform random masking's k/n. Red = the masker wants it, grey = it avoids it.
"""

from __future__ import annotations

import argparse
import html
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
import amt_plugin  # noqa: E402,F401
from amt_plugin import masking  # noqa: E402


def masking_probabilities(checkpoint: Path, data: Path, lines: list[str], bpe_dir: Path | None,
                          draws: int = 256) -> list[list[tuple[str, float, float]]]:
    """Per line: (piece, P(masked) under the masker, P(masked) under uniform masking)."""
    from fairseq import checkpoint_utils

    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task(
        [str(checkpoint)], arg_overrides={"data": str(data)})
    model = models[0].eval()
    if not hasattr(model, "masker"):
        raise SystemExit(f"{checkpoint} has no masker (not an amt checkpoint)")
    d = task.source_dictionary
    crit = cfg.criterion
    if bpe_dir is not None:
        from bpe import load_encoder

        encode = load_encoder(bpe_dir)
    else:  # the text is already in the dictionary's pieces
        encode = str.strip
    # what the criterion never masks (madeupword fillers included), and whole words when the
    # checkpoint was trained with them
    specials = torch.tensor(task.special_token_ids())
    out = []
    for line in lines:
        pieces = encode(line).split()
        tokens = torch.tensor([[d.bos()] + [d.index(p) for p in pieces] + [d.eos()]])
        with torch.no_grad():
            logits = model.masker(tokens)

        def draw_masker(available, k, u, logits=logits):
            return masking.gumbel_top_k_from_uniform(logits, available, k,
                                                     crit.masker_temperature, u)

        counts = torch.zeros(tokens.shape)
        g = torch.Generator().manual_seed(0)
        for _ in range(draws):
            choice = masking.choose(tokens, specials, cfg.task.mask_prob, "learned", g,
                                    is_word_start=task.is_word_start, draw_masker=draw_masker,
                                    random_share=crit.masker_random_share)
            counts += choice.mask.float()
        p = (counts / draws)[0, 1:-1].tolist()
        # uniform masking picks k of the n units; in whole-word mode every piece of a word
        # goes with it, so a piece's chance is that of its word
        uniform = float(choice.k[0]) / max(int(choice.units.sum()), 1)
        out.append([(piece, prob, uniform) for piece, prob in zip(pieces, p)])
    return out


def ansi(rows: list[list[tuple[str, float, float]]]) -> str:
    lines = []
    for row in rows:
        parts = []
        for piece, p, uniform in row:
            ratio = p / uniform if uniform else 0.0
            colour = "1;31" if ratio > 2 else "31" if ratio > 1.2 else "90" if ratio < 0.5 else "0"
            parts.append(f"\033[{colour}m{piece}\033[0m")
        lines.append(" ".join(parts))
        lines.append("  " + " ".join(f"{piece}:{p:.2f}" for piece, p, _ in row))
    return "\n".join(lines)


def page(rows: list[list[tuple[str, float, float]]], title: str) -> str:
    body = []
    for row in rows:
        spans = []
        for piece, p, uniform in row:
            ratio = min(p / uniform, 4.0) / 4.0 if uniform else 0.0
            spans.append(
                f'<span title="P(masked) = {p:.3f} (uniform {uniform:.3f})" '
                f'style="background: rgba(220, 40, 40, {ratio:.2f})">{html.escape(piece)}</span>')
        body.append("<p>" + " ".join(spans) + "</p>")
    return (f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>"
            "<style>body{font-family:monospace;max-width:60em;margin:2em auto;line-height:2}"
            "span{padding:2px 3px;border-radius:3px}</style>"
            f"<h1>What the masker masks</h1><p>{html.escape(title)}. Shade: P(masked) relative"
            " to uniform random masking (white: at most uniform, deep red: 4x). Hover for the"
            " numbers.</p>" + "\n".join(body))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("text", nargs="*", help="sentences (default: stdin, one per line)")
    parser.add_argument("--data", type=Path, required=True, help="binarized data (dict.txt)")
    parser.add_argument("--bpe-dir", type=Path, help="encode raw text with this BPE first")
    parser.add_argument("--html", type=Path, help="also write an HTML page here")
    parser.add_argument("--draws", type=int, default=256)
    args = parser.parse_intermixed_args(argv)
    lines = args.text or [x for x in sys.stdin.read().splitlines() if x.strip()]
    rows = masking_probabilities(args.checkpoint, args.data, lines, args.bpe_dir, args.draws)
    print(ansi(rows))
    if args.html:
        args.html.write_text(page(rows, str(args.checkpoint)))
        print(f"wrote {args.html}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
