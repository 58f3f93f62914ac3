"""BLiMP scoring (scripts/evaluate_blimp.py): masked copies, both PLLs against a direct
computation, normalisation, reading pairs."""

import json
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import build, stock_roberta

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import evaluate_blimp  # noqa: E402


def test_masked_copies_mask_the_rest_of_the_word_to_the_right():
    starts = [True, False, False, True, True, False]  # words: [0 1 2] [3] [4 5]
    assert evaluate_blimp.masked_copies(starts, "pll") == [(i, [i]) for i in range(6)]
    assert evaluate_blimp.masked_copies(starts, "pll-word-l2r") == [
        (0, [0, 1, 2]), (1, [1, 2]), (2, [2]), (3, [3]), (4, [4, 5]), (5, [5])]


def direct_pll(model, ids, starts, scoring, d) -> float:
    """One forward per scored piece, unbatched and unpadded: the definition, written out."""
    full = [d.bos(), *ids, d.eos()]
    total = 0.0
    for i in range(len(ids)):
        masked = {i}
        if scoring == "pll-word-l2r":
            j = i + 1
            while j < len(ids) and not starts[j]:
                masked.add(j)
                j += 1
        x = torch.tensor([d.index("<mask>") if p - 1 in masked else t
                          for p, t in enumerate(full)])
        logits = model(x[None])[0][0]  # (T, V)
        total += logits[i + 1].log_softmax(-1)[full[i + 1]].item()
    return total


@pytest.mark.parametrize("scoring", ["pll", "pll-word-l2r"])
def test_batched_pll_equals_the_direct_computation(scoring):
    task, amt, _ = build()
    model = stock_roberta(task, amt).eval()
    d = task.source_dictionary
    g = torch.Generator().manual_seed(0)
    sentences = [torch.randint(d.nspecial, d.nspecial + 50, (n,), generator=g).tolist()
                 for n in (3, 7, 5, 9)]
    # the tiny dictionary's even symbols start a word
    starts = [[True] + [d[t].startswith("\u2581") for t in s[1:]] for s in sentences]
    with torch.no_grad():
        batched = evaluate_blimp.pseudo_log_likelihoods(
            model, sentences, starts, scoring, d.bos(), d.eos(), d.pad(), d.index("<mask>"),
            max_tokens=40)  # several batches, padded within each
        direct = [direct_pll(model, s, w, scoring, d) for s, w in zip(sentences, starts)]
    assert batched == pytest.approx(direct, abs=1e-4)
    if scoring == "pll-word-l2r":  # the two scorings differ where words have several pieces
        plain = evaluate_blimp.pseudo_log_likelihoods(
            model, sentences, starts, "pll", d.bos(), d.eos(), d.pad(), d.index("<mask>"))
        assert plain != pytest.approx(batched, abs=1e-4)


def test_normalisation_writes_sentences_as_the_corpus_does():
    s = "Who isn't hugging Richard's 2 dogs?"
    assert evaluate_blimp.normalise(s, "ptb") == "who is n't hugging richard 's N dogs"
    assert evaluate_blimp.normalise(s, "wikitext") == "Who is n't hugging Richard 's 2 dogs ?"
    assert evaluate_blimp.normalise(s, "none") == s


def test_pairs_are_read_per_paradigm_and_bad_files_named(tmp_path):
    rows = [{"sentence_good": f"g{i}", "sentence_bad": f"b{i}", "field": "syntax",
             "UID": "p1" if i < 3 else "p2"} for i in range(5)]
    (tmp_path / "x.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs = evaluate_blimp.load_pairs(tmp_path, per_paradigm=2)
    assert [p["sentence_good"] for p in pairs] == ["g0", "g1", "g3", "g4"]
    shipped = evaluate_blimp.load_pairs(None, None)
    assert len({p["UID"] for p in shipped}) >= 40 and len(shipped) >= 2000
    (tmp_path / "y.jsonl").write_text('{"sentence_good": "a"}\n')
    with pytest.raises(evaluate_blimp.BlimpError, match=r"y.jsonl:1 is not a BLiMP pair"):
        evaluate_blimp.load_pairs(tmp_path, None)
