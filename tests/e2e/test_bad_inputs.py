"""Bad input gets an error that names the problem and the fix, before any work, and leaves every
existing output as it was. docs/robustness.md tables every case with the test that covers it;
the run.sh cases that were there before live in test_pipeline.py."""

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.conftest import BIN, ENV, PLUGIN, ROOT, preprocess, train, train_args
from tests.e2e.test_pipeline import glue_fixtures, run_sh

pytestmark = pytest.mark.slow
SCRIPTS = ROOT / "scripts"


def run(cmd, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, env=ENV, timeout=600, **kwargs)


def refused(proc, message: str) -> None:
    assert proc.returncode != 0, proc.stdout[-3000:]
    assert message in proc.stdout, proc.stdout[-3000:]
    assert "Traceback" not in proc.stdout, proc.stdout[-3000:]


def snapshot(d: Path) -> dict:
    return {p: p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


# --- run.sh: the corpus, GLUE files, strategies -----------------------------------------------

def small_corpus(d: Path, lines: int = 300) -> Path:
    d.mkdir(parents=True)
    rng = random.Random(0)
    for split in ("train", "valid", "test"):
        (d / f"{split}.txt").write_text("".join(
            " ".join(f"w{rng.randrange(50)}" for _ in range(8)) + "\n" for _ in range(lines)))
    return d


def bad_glue(root: Path, case: str) -> Path:
    glue = glue_fixtures(root)
    task = {"column": "RTE", "label": "RTE", "number": "STS-B", "unseen": "RTE"}[case]
    f = glue / task / "train.tsv"
    lines = f.read_text().splitlines()
    if case == "unseen":  # every training row entailment: dev's not_entailment is unseen
        f.write_text("\n".join([lines[0]] + [line.rsplit("\t", 1)[0] + "\tentailment"
                                            for line in lines[1:]]) + "\n")
        return glue
    cols = lines[3].split("\t")
    if case == "column":
        lines[3] = "\t".join(cols[:2])
    elif case == "label":
        lines[3] = "\t".join(cols[:-1] + [""])
    else:
        lines[3] = "\t".join(cols[:-1] + ["high"])
    f.write_text("\n".join(lines) + "\n")
    return glue


@pytest.mark.parametrize("case,message", [
    ("non_utf8", "is not UTF-8: byte 0xff at offset"),
    ("one_line", "is too small for a vocabulary of 8000 pieces"),
    ("strategy", "argument --masking-strategy: invalid choice: 'clever'"),
    ("compare", "--compare: unknown strategy clever; choose from"),
    ("blimp_dir", "holds no *.jsonl files"),
    ("glue_column", "line 4 has 2 tab-separated column(s), RTE needs 4"),
    ("glue_label", "line 4 has no label"),
    ("glue_number", "STS-B's label must be a number, got 'high'"),
    ("glue_unseen", "has labels that train.tsv lacks (not_entailment)"),
    ("glue_nowhere", "need --glue-dir DIR"),
])
def test_run_sh_refuses_bad_input_before_any_work(case, message, tmp_path):
    corpus = small_corpus(tmp_path / "corpus")
    out = tmp_path / "out"
    args = ["--out", str(out), "--corpus", str(corpus), "--cpu"]
    if case == "non_utf8":
        message += f" {(corpus / 'valid.txt').stat().st_size + 3} (line 301)"
        with open(corpus / "valid.txt", "ab") as f:
            f.write(b"caf\xff au lait\n")
    elif case == "one_line":
        for split in ("train", "valid", "test"):
            (corpus / f"{split}.txt").write_text("the cat sat on the mat\n")
    elif case == "strategy":
        args += ["--masking-strategy", "clever"]
    elif case == "compare":
        args += ["--compare", "random,clever"]
    elif case == "blimp_dir":
        (tmp_path / "blimp").mkdir()
        args += ["--blimp-dir", str(tmp_path / "blimp")]
    elif case.startswith("glue_") and case != "glue_nowhere":
        glue = bad_glue(tmp_path / "glue", case.removeprefix("glue_"))
        task = "STS-B" if case == "glue_number" else "RTE"
        args += ["--glue", task, "--glue-dir", str(glue)]
    else:
        args += ["--glue", "RTE"]
    before = snapshot(corpus)
    proc = run_sh(*args, timeout=300)
    refused(proc, message)
    assert snapshot(corpus) == before
    assert not (out / "bin").exists() and not (out / "learned").exists()


def test_empty_lines_in_the_corpus_are_accepted(zipf_data, tmp_path):
    """Empty lines (WikiText's paragraph breaks) are no error: they binarize to an end of
    sentence alone and train like any other line."""
    text = tmp_path / "text"
    text.mkdir()
    rng = random.Random(0)
    for split, n in (("train", 400), ("valid", 40)):
        (text / f"{split}.txt").write_text("".join(
            ("" if i % 3 == 0 else " ".join(f"w{rng.randrange(60)}" for _ in range(9))) + "\n"
            for i in range(n)))
    data = preprocess(text, tmp_path / "bin")
    proc = train(data, tmp_path / "ck", "--max-update", "4", "--masker-warmup-updates", "2",
                 "--sample-break-mode", "complete")
    assert "num_updates" in proc.stdout


# --- checkpoints given to every command that loads one --------------------------------------

@pytest.fixture(scope="module")
def trained(zipf_data, tmp_path_factory):
    ck = tmp_path_factory.mktemp("trained")
    train(zipf_data, ck, "--max-update", "4", "--masker-warmup-updates", "2")
    return ck / "checkpoint_last.pt"


@pytest.fixture(scope="module")
def other_data(tmp_path_factory) -> Path:
    """Binarized data with another dictionary (120 types)."""
    d = tmp_path_factory.mktemp("other")
    rng = random.Random(3)
    for split, n in (("train", 200), ("valid", 20)):
        (d / f"{split}.txt").write_text("".join(
            " ".join(f"v{rng.randrange(120)}" for _ in range(10)) + "\n" for _ in range(n)))
    return preprocess(d, d / "bin")


@pytest.fixture(scope="module")
def truncated(trained, tmp_path_factory) -> Path:
    cut = tmp_path_factory.mktemp("cut") / "checkpoint_cut.pt"
    cut.write_bytes(trained.read_bytes()[: trained.stat().st_size // 2])
    return cut


def spm_dir(d: Path) -> Path:
    """A SentencePiece BPE trained on text other than the checkpoint's (English words)."""
    sys.path.insert(0, str(SCRIPTS))
    from bpe import train_sentencepiece

    d.mkdir()
    rng = random.Random(0)
    words = "the cat sat on a mat and then it ran far away from home".split()
    (d / "text.txt").write_text("".join(" ".join(rng.choices(words, k=10)) + "\n"
                                        for _ in range(200)))
    train_sentencepiece(d / "text.txt", d, 60)
    return d


VALIDATE = ["--user-dir", PLUGIN, "--task", "adversarial_masked_lm", "--criterion",
            "adversarial_masked_lm", "--cpu", "--batch-size", "8"]
NOT_READABLE = "is not a readable checkpoint (BadZipFile"
# 120 words: 4 specials, 120, 4 fillers to a multiple of 8 (fairseq-preprocess), <mask>
OTHER_DICT = "its dictionary has 305 entries and this command's has 129"


@pytest.mark.parametrize("command,case,message", [
    ("train", "missing", "--restore-file {missing} does not exist"),
    ("train", "truncated", NOT_READABLE),
    ("train", "other_dict", OTHER_DICT),
    ("train", "other_arch", "differ in shape (first: encoder.sentence_encoder.embed_tokens"
                            ".weight: (305, 128) in the checkpoint, (305, 256) in the model)"),
    ("validate", "truncated", NOT_READABLE),
    ("validate", "other_dict", OTHER_DICT),
    ("export_roberta", "truncated", NOT_READABLE),
    ("export_roberta", "other_dict", "dict.txt gives 129 symbols"),
    ("evaluate_checkpoint", "truncated", NOT_READABLE),
    ("evaluate_checkpoint", "other_dict", OTHER_DICT),
    ("export_hf", "truncated", NOT_READABLE),
    ("export_hf", "other_bpe", "does not match"),
    ("evaluate_blimp", "other_bpe", "does not match"),
], ids=lambda x: x if isinstance(x, str) and len(x) < 24 else "")
def test_a_checkpoint_that_cannot_be_used_is_refused_with_the_reason(
        command, case, message, trained, truncated, other_data, zipf_data, tmp_path):
    checkpoint = truncated if case == "truncated" else trained
    data = other_data if case == "other_dict" else zipf_data
    missing = tmp_path / "nope.pt"
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("earlier output")
    if command == "train":
        arch = ["--arch", "amt_small"] if case == "other_arch" else []
        restore = missing if case == "missing" else checkpoint
        cmd = [*train_args(data, out, "--max-update", "8", "--restore-file", str(restore),
                           *arch)]
    elif command == "validate":
        cmd = [BIN / "fairseq-validate", data, "--path", checkpoint, *VALIDATE]
    elif command == "export_roberta":
        cmd = [sys.executable, SCRIPTS / "export_roberta.py", checkpoint, out, "--data", data]
    elif command == "evaluate_checkpoint":
        cmd = [sys.executable, SCRIPTS / "evaluate_checkpoint.py", checkpoint, "--data", data]
    elif command == "export_hf":
        bpe = spm_dir(tmp_path / "bpe")
        cmd = [sys.executable, SCRIPTS / "export_hf.py", checkpoint, "--out", out / "hf",
               "--data", data, "--bpe-dir", bpe]
    else:
        bpe = spm_dir(tmp_path / "bpe")
        blimp = tmp_path / "blimp"
        blimp.mkdir()
        (blimp / "p.jsonl").write_text(json.dumps({
            "sentence_good": "the cat sat", "sentence_bad": "cat the sat", "field": "syntax",
            "UID": "p", "pairID": "0"}) + "\n")
        cmd = [sys.executable, SCRIPTS / "evaluate_blimp.py", checkpoint, "--data", data,
               "--bpe-dir", bpe, "--blimp-dir", blimp]
    before = {checkpoint: checkpoint.read_bytes(), **snapshot(out)}
    proc = run(cmd)
    refused(proc, message.format(missing=missing))
    assert {checkpoint: checkpoint.read_bytes(), **snapshot(out)} == before


def test_a_model_without_a_masker_is_refused_for_learned_masking(zipf_data, tmp_path):
    args = train_args(zipf_data, tmp_path / "ck", "--max-update", "2")
    for flag in ("--optimizer", "--masker-lr"):  # amt_adam's: the plain model has no roles
        i = args.index(flag)
        del args[i:i + 2]
    proc = run([*args, "--arch", "roberta", "--encoder-layers", "1", "--encoder-embed-dim", "16",
                "--encoder-ffn-embed-dim", "16", "--encoder-attention-heads", "1",
                "--optimizer", "adam"])
    refused(proc, "--masking-strategy learned needs a model with a masker")
    assert not (tmp_path / "ck").exists() or not any((tmp_path / "ck").iterdir())


@pytest.mark.parametrize("flag,message", [
    (["--mask-prob", "0"], "--mask-prob must be in (0, 1], got 0.0"),
    (["--adam-betas", "(0.9,)"], "--adam-betas must be two numbers in [0, 1)"),
    (["--masker-temperature", "0"], "--masker-temperature must be > 0"),
])
def test_bad_training_flags_are_one_line_errors(flag, message, zipf_data, tmp_path):
    proc = run(train_args(zipf_data, tmp_path / "ck", "--max-update", "2", *flag))
    refused(proc, f"error: {message}")
