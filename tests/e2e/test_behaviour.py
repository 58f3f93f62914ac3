"""The masker learns to skip frequent filler tokens that carry no information.

Synthetic corpus: each line is 6 content words repeated once (c_a .. c_f c_a .. c_f, drawn from
600 types, so a content word is predictable only from its twin elsewhere in the line),
interleaved with a fixed cycle of 3 filler types (f0 f1 f2: half of all tokens, the most
frequent types, predictable from position alone). The predictor soon predicts the fillers, so
the masker's reward is on content words and it should pick them: its share of masked tokens
among the 100 most frequent types must fall clearly below uniform random masking's (~0.6).
"""

import random

import pytest

from tests.e2e.conftest import json_logs, preprocess, train

pytestmark = pytest.mark.slow


def write_lines(path, n: int, rng: random.Random) -> None:
    content = [f"c{i}" for i in range(600)]
    with open(path, "w") as f:
        for _ in range(n):
            half = rng.sample(content, 6)
            words = [w for i, c in enumerate(half + half) for w in (c, f"f{i % 3}")]
            f.write(" ".join(words) + "\n")


def test_masker_prefers_informative_tokens(tmp_path):
    rng = random.Random(0)
    write_lines(tmp_path / "train.txt", 3000, rng)
    write_lines(tmp_path / "valid.txt", 200, rng)
    data = preprocess(tmp_path, tmp_path / "bin")
    proc = train(data, tmp_path / "ck", "--max-update", "160", "--masker-warmup-updates", "20",
                 "--masker-lr", "3e-3", "--sample-break-mode", "eos", "--dropout", "0",
                 "--log-interval", "20", "--no-save")
    inner = json_logs(proc.stdout, "train_inner")
    first, last = inner[0], inner[-3:]  # the first window is warm-up: random masking
    assert abs(float(first["mask_top100_share"]) - float(first["mask_rand_top100_share"])) < 0.05
    share = sum(float(x["mask_top100_share"]) for x in last) / len(last)
    rand = sum(float(x["mask_rand_top100_share"]) for x in last) / len(last)
    print(f"masker top-100 share {share:.3f} vs random {rand:.3f}")
    assert rand > 0.5
    assert share < rand - 0.2, (share, rand)
    # and it does so without collapsing: entropy well above zero
    assert float(inner[-1]["masker_entropy"]) > 1.0
