"""BLiMP, zero-shot: does the predictor prefer the grammatical sentence of each minimal pair?

    python scripts/evaluate_blimp.py CHECKPOINT --bpe-dir BPE [--blimp-dir DIR]
        [--scoring pll-word-l2r|pll] [--pairs-per-paradigm N] [--normalise ptb|wikitext|none]
        [--data DIR] [--json OUT]

CHECKPOINT is an exported predictor (`OUT/STRATEGY/roberta/model.pt`, a stock fairseq
`roberta` checkpoint; its directory holds dict.txt) or an AMT checkpoint with `--data BIN`.
BPE is the pretraining's BPE directory (`OUT/bpe`: spm.model, or GPT-2's files).

Each sentence is scored by its pseudo-log-likelihood, the sum over its tokens of
log p(token | the sentence with that token masked):
- `pll-word-l2r` (default; Kauf & Ivanova, ACL 2023): a token is masked together with the
  rest of its word to its right, so a word split into many pieces is not scored as if each
  piece were nearly given by its neighbours (plain PLL's bias for such words);
- `pll` (Salazar et al., ACL 2020): one token masked at a time.
A pair counts as right when the good sentence scores higher; a tie counts half. A pair with a
sentence longer than the model's positions is left out (counted as `skipped_too_long`). Accuracy is
given overall, per field (morphology, syntax, semantics, syntax/semantics) and per paradigm,
in percent; with the same number of pairs per paradigm, overall is the mean of the paradigms.

BLiMP (Warstadt et al., TACL 2020; https://github.com/alexwarstadt/blimp, CC BY 4.0) has 67
paradigms of 1,000 pairs. `--blimp-dir` reads its `*.jsonl` files (as in the release's
`data/`); `--download DIR` fetches them from the official repository first. Without either,
the subset shipped in `scripts/blimp/` is used (see its README: a sample of pairs, with
attribution). `--normalise` writes BLiMP's sentences the way the pretraining corpus writes
text: `ptb` (lower case, no punctuation, clitics split: "isn't" -> "is n't"), `wikitext`
(punctuation and clitics split off, as WikiText's tokenisation does), `none`.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import urllib.request
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
from bpe import check_matches, load_encoder  # noqa: E402

import amt_plugin  # noqa: E402,F401  (weights-only checkpoint loading; AMT checkpoints)
from amt_plugin.masking import symbol_starts_word  # noqa: E402

SHIPPED = HERE / "blimp" / "blimp_subset.jsonl"
BLIMP_URL = "https://raw.githubusercontent.com/alexwarstadt/blimp/master/data/{}.jsonl"
PARADIGMS = (
    "adjunct_island anaphor_gender_agreement anaphor_number_agreement animate_subject_passive "
    "animate_subject_trans causative complex_NP_island "
    "coordinate_structure_constraint_complex_left_branch "
    "coordinate_structure_constraint_object_extraction determiner_noun_agreement_1 "
    "determiner_noun_agreement_2 determiner_noun_agreement_irregular_1 "
    "determiner_noun_agreement_irregular_2 determiner_noun_agreement_with_adj_2 "
    "determiner_noun_agreement_with_adj_irregular_1 "
    "determiner_noun_agreement_with_adj_irregular_2 "
    "determiner_noun_agreement_with_adjective_1 distractor_agreement_relational_noun "
    "distractor_agreement_relative_clause drop_argument ellipsis_n_bar_1 ellipsis_n_bar_2 "
    "existential_there_object_raising existential_there_quantifiers_1 "
    "existential_there_quantifiers_2 existential_there_subject_raising "
    "expletive_it_object_raising inchoative intransitive "
    "irregular_past_participle_adjectives irregular_past_participle_verbs "
    "irregular_plural_subject_verb_agreement_1 irregular_plural_subject_verb_agreement_2 "
    "left_branch_island_echo_question left_branch_island_simple_question "
    "matrix_question_npi_licensor_present npi_present_1 npi_present_2 "
    "only_npi_licensor_present only_npi_scope passive_1 passive_2 principle_A_c_command "
    "principle_A_case_1 principle_A_case_2 principle_A_domain_1 principle_A_domain_2 "
    "principle_A_domain_3 principle_A_reconstruction "
    "regular_plural_subject_verb_agreement_1 regular_plural_subject_verb_agreement_2 "
    "sentential_negation_npi_licensor_present sentential_negation_npi_scope "
    "sentential_subject_island superlative_quantifiers_1 superlative_quantifiers_2 "
    "tough_vs_raising_1 tough_vs_raising_2 transitive wh_island wh_questions_object_gap "
    "wh_questions_subject_gap wh_questions_subject_gap_long_distance wh_vs_that_no_gap "
    "wh_vs_that_no_gap_long_distance wh_vs_that_with_gap wh_vs_that_with_gap_long_distance"
).split()
SCORINGS = ("pll-word-l2r", "pll")


class BlimpError(ValueError):
    """A problem with the user's BLiMP files or arguments."""


# --- the data ---------------------------------------------------------------------------------

def load_pairs(blimp_dir: Path | None, per_paradigm: int | None) -> list[dict]:
    """BLiMP's pairs (dicts with sentence_good, sentence_bad, field, UID), the first
    `per_paradigm` of each paradigm, from *.jsonl files in blimp_dir or the shipped subset."""
    files = sorted(blimp_dir.glob("*.jsonl")) if blimp_dir else [SHIPPED]
    if not files:
        raise BlimpError(f"no *.jsonl files in {blimp_dir}; give the directory of BLiMP's "
                         "data/ (or --download DIR to fetch it)")
    by_uid: dict[str, list[dict]] = {}
    for f in files:
        for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                pair = json.loads(line)
                pair["UID"], pair["field"]  # noqa: B018
                pair["sentence_good"], pair["sentence_bad"]  # noqa: B018
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise BlimpError(f"{f}:{n} is not a BLiMP pair (JSON with sentence_good, "
                                 f"sentence_bad, field, UID): {e}") from None
            by_uid.setdefault(pair["UID"], []).append(pair)
    return [p for uid in sorted(by_uid) for p in by_uid[uid][:per_paradigm]]


def download(dest: Path) -> Path:
    """BLiMP's 67 paradigm files from the official repository into dest (kept if present)."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in PARADIGMS:
        target = dest / f"{name}.jsonl"
        if target.is_file():
            continue
        partial = target.with_suffix(".partial")
        try:
            with urllib.request.urlopen(BLIMP_URL.format(name), timeout=60) as r:
                partial.write_bytes(r.read())
        except OSError as e:
            raise BlimpError(f"could not download BLiMP's {name} ({e}); give a local copy "
                             "with --blimp-dir") from None
        partial.replace(target)
    return dest



def normalise(sentence: str, style: str) -> str:
    """BLiMP's sentence written the way the pretraining corpus writes text."""
    if style == "none":
        return sentence
    s = re.sub(r"(\w)(n't)\b", r"\1 \2", sentence)
    s = re.sub(r"(\w)('s|'re|'ve|'ll|'d|'m)\b", r"\1 \2", s)
    if style == "ptb":  # lower case, numbers as N, no punctuation but the clitics' apostrophes
        s = re.sub(r"[^\w' ]", " ", s.lower())
        s = re.sub(r"\b\d[\d,.]*\b", "N", s)
    elif style == "wikitext":
        s = re.sub(r"([^\w' ])", r" \1 ", s)
    else:
        raise BlimpError(f"unknown --normalise '{style}'; use ptb, wikitext or none")
    return " ".join(s.split())


# --- scoring ------------------------------------------------------------------------------------

def masked_copies(word_start: list[bool], scoring: str) -> list[tuple[int, list[int]]]:
    """For a sentence of n pieces (word_start[i]: does piece i begin a word), one entry per
    piece: (the piece scored, the pieces masked). Positions are 0-based within the sentence."""
    if scoring not in SCORINGS:
        raise BlimpError(f"unknown --scoring '{scoring}'; use one of {', '.join(SCORINGS)}")
    n = len(word_start)
    copies = []
    for i in range(n):
        masked = [i]
        if scoring == "pll-word-l2r":  # and the rest of i's word to its right
            j = i + 1
            while j < n and not word_start[j]:
                masked.append(j)
                j += 1
        copies.append((i, masked))
    return copies


@torch.no_grad()
def pseudo_log_likelihoods(model, sentences: list[list[int]], word_starts: list[list[bool]],
                           scoring: str, bos: int, eos: int, pad: int, mask: int,
                           max_tokens: int = 16384) -> list[float]:
    """PLL (natural log) of each sentence (its piece ids, without <s> and </s>): every masked
    copy of every sentence, batched by length, one forward each, the LM head only where
    scored."""
    rows = []  # (sentence index, input ids, scored position, target)
    for s, (ids, starts) in enumerate(zip(sentences, word_starts)):
        full = [bos, *ids, eos]
        for i, masked in masked_copies(starts, scoring):
            x = list(full)
            for j in masked:
                x[j + 1] = mask
            rows.append((s, x, i + 1, full[i + 1]))
    rows.sort(key=lambda r: len(r[1]))
    device = next(model.parameters()).device
    pll = [0.0] * len(sentences)
    start = 0
    while start < len(rows):
        end = start + 1
        while end < len(rows) and (end - start + 1) * len(rows[end][1]) <= max_tokens:
            end += 1
        T = len(rows[end - 1][1])
        batch = rows[start:end]
        tokens = torch.full((len(batch), T), pad, dtype=torch.long)
        scored = torch.zeros(len(batch), T, dtype=torch.bool)
        for b, (_, x, pos, _) in enumerate(batch):
            tokens[b, :len(x)] = torch.tensor(x)
            scored[b, pos] = True
        logits = model(tokens.to(device), masked_tokens=scored.to(device))[0]  # (b, V)
        logp = logits.float().log_softmax(-1)
        targets = torch.tensor([r[3] for r in batch], device=device)
        values = logp.gather(1, targets[:, None]).squeeze(1).tolist()
        for (s, _, _, _), v in zip(batch, values):
            pll[s] += v
        start = end
    return pll


def load_model(checkpoint: Path, data: Path | None):
    """(model in eval mode, its dictionary) from an exported roberta or an AMT checkpoint."""
    from fairseq import checkpoint_utils

    if not checkpoint.is_file():
        raise BlimpError(f"checkpoint {checkpoint} does not exist")
    data = data or checkpoint.parent
    if not (data / "dict.txt").is_file():
        raise BlimpError(f"no dict.txt in {data}: give the pretraining's binarized data with "
                         "--data (an exported predictor's directory holds one)")
    models, _, task = checkpoint_utils.load_model_ensemble_and_task(
        [str(checkpoint)], arg_overrides={"data": str(data)})
    return models[0].eval(), task.source_dictionary


def word_start_table(dictionary, bpe_dir: Path) -> list[bool]:
    """Does each dictionary symbol begin a word? (SentencePiece or GPT-2 BPE, as the task reads
    it for whole-word masking)."""
    if (bpe_dir / "spm.model").is_file():
        return symbol_starts_word(dictionary.symbols)
    return symbol_starts_word(dictionary.symbols,
                              json.loads((bpe_dir / "encoder.json").read_text()))


def evaluate(checkpoint: Path, bpe_dir: Path, blimp_dir: Path | None = None,
             scoring: str = "pll-word-l2r", per_paradigm: int | None = None,
             style: str = "none", data: Path | None = None, gpu: bool = False) -> dict:
    pairs = load_pairs(blimp_dir, per_paradigm)
    model, d = load_model(checkpoint, data)
    if gpu and torch.cuda.is_available():
        model.cuda()
    try:
        encode = load_encoder(bpe_dir)
        check_matches(bpe_dir, d.symbols[d.nspecial:], f"{checkpoint}'s dictionary")
    except (FileNotFoundError, ValueError) as e:
        raise BlimpError(str(e)) from None
    starts_table = word_start_table(d, bpe_dir)
    longest = model.max_positions() - 2  # <s> and </s>
    sentences, starts, kept = [], [], []
    for p in pairs:
        pair = [d.encode_line(encode(normalise(p[key], style)), add_if_not_exist=False,
                              append_eos=False).long().tolist()
                for key in ("sentence_good", "sentence_bad")]
        if max(len(ids) for ids in pair) > longest:
            continue  # a sentence the model cannot read whole: the pair is not scored
        kept.append(p)
        for ids in pair:
            sentences.append(ids)
            starts.append([True] + [starts_table[i] for i in ids[1:]])
    if not kept:
        raise BlimpError(f"every pair has a sentence longer than the model's {longest} "
                         "positions")
    skipped, pairs = len(pairs) - len(kept), kept
    pll = pseudo_log_likelihoods(model, sentences, starts, scoring, d.bos(), d.eos(), d.pad(),
                                 d.index("<mask>"))
    by_paradigm: dict[str, list[float]] = {}
    field_of = {}
    for n, p in enumerate(pairs):
        good, bad = pll[2 * n], pll[2 * n + 1]
        right = 1.0 if good > bad else 0.5 if good == bad else 0.0
        by_paradigm.setdefault(p["UID"], []).append(right)
        field_of[p["UID"]] = p["field"].replace("_", "/")  # BLiMP spells it both ways
    paradigms = {u: 100 * statistics.fmean(v) for u, v in by_paradigm.items()}
    fields = {}
    for f in sorted(set(field_of.values())):
        fields[f] = statistics.fmean(a for u, a in paradigms.items() if field_of[u] == f)
    return {"accuracy": statistics.fmean(paradigms.values()), "fields": fields,
            "paradigms": paradigms, "scoring": scoring, "normalise": style,
            "pairs": len(pairs), "skipped_too_long": skipped,
            "pairs_per_paradigm": per_paradigm,
            "source": str(blimp_dir) if blimp_dir else "shipped subset"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="exported model.pt or AMT checkpoint")
    parser.add_argument("--bpe-dir", type=Path, required=True, help="the pretraining's BPE")
    parser.add_argument("--data", type=Path, help="dir with dict.txt (default: the "
                        "checkpoint's directory)")
    parser.add_argument("--blimp-dir", type=Path, help="BLiMP's *.jsonl (default: the "
                        "shipped subset)")
    parser.add_argument("--download", type=Path, metavar="DIR",
                        help="fetch BLiMP's 67 paradigms into DIR and use them")
    parser.add_argument("--scoring", choices=SCORINGS, default="pll-word-l2r")
    parser.add_argument("--pairs-per-paradigm", type=int, help="the first N of each paradigm")
    parser.add_argument("--normalise", choices=("ptb", "wikitext", "none"), default="none")
    parser.add_argument("--gpu", action="store_true", help="run on the GPU if there is one")
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args(argv)
    try:
        blimp_dir = download(args.download) if args.download else args.blimp_dir
        result = evaluate(args.checkpoint, args.bpe_dir, blimp_dir, args.scoring,
                          args.pairs_per_paradigm, args.normalise, args.data, args.gpu)
    except BlimpError as e:
        print(f"evaluate_blimp.py: error: {e}", file=sys.stderr)
        return 2
    print(f"BLiMP ({result['source']}, {result['pairs']} pairs, {args.scoring}): "
          f"{result['accuracy']:.1f}%")
    for f, a in result["fields"].items():
        print(f"  {f}: {a:.1f}%")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
