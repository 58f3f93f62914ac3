"""run.sh end to end on tiny data: GLUE-format fixtures, resume, downloads, bad inputs."""

import functools
import http.server
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest

from tests.e2e.conftest import BIN, ENV, ROOT

pytestmark = pytest.mark.slow

RUN = str(ROOT / "run.sh")
RUN_ENV = {**ENV, "PATH": f"{BIN}:{ENV['PATH']}"}
TINY = ["--vocab-size", "120", "--max-update", "16", "--seeds", "1", "--cpu", "--",
        "criterion.masker_warmup_updates=4", "task.tokens_per_sample=64",
        "model.max_positions=64", "dataset.batch_size=16", "common.log_interval=8"]


def words(rng: random.Random, n: int) -> str:
    return " ".join(f"w{min(int(rng.paretovariate(1.2)), 199)}" for _ in range(n))


def corpus_files(d: Path) -> Path:
    """A tiny Zipf-like corpus in run.sh's directory layout."""
    d.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    for split, n in (("train", 1200), ("valid", 100), ("test", 300)):
        (d / f"{split}.txt").write_text(
            "".join(words(rng, rng.randint(6, 20)) + "\n" for _ in range(n)))
    return d


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return corpus_files(tmp_path_factory.mktemp("corpus"))


def glue_fixtures(root: Path, rows: int = 40) -> Path:
    """A few dozen rows per task in GLUE's real column layouts and headers."""
    rng = random.Random(1)
    s = functools.partial(words, rng)
    layouts = {
        "RTE": ("index\tsentence1\tsentence2\tlabel",
                lambda i: f"{i}\t{s(8)}\t{s(5)}\t{rng.choice(['entailment', 'not_entailment'])}"),
        "MRPC": ("Quality\t#1 ID\t#2 ID\t#1 String\t#2 String",
                 lambda i: f"{rng.randint(0, 1)}\t{i}\t{i + 1000}\t{s(9)}\t{s(9)}"),
        "STS-B": ("index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\t"
                  "sentence2\tscore",
                  lambda i: f"{i}\tmain-news\tf\t2012\t{i}\tnone\tnone\t{s(7)}\t{s(7)}\t"
                            f"{rng.uniform(0, 5):.3f}"),
        "CoLA": (None, lambda i: f"gj04\t{rng.randint(0, 1)}\t\t{s(7)}"),
        "SST-2": ("sentence\tlabel", lambda i: f"{s(10)}\t{rng.randint(0, 1)}"),
    }
    for task, (header, row) in layouts.items():
        (root / task).mkdir(parents=True)
        for split, n in (("train", rows), ("dev", rows // 2)):
            lines = ([header] if header else []) + [row(i) for i in range(n)]
            (root / task / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return root


def run_sh(*args: str, timeout: int = 900, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([RUN, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, env=RUN_ENV, timeout=timeout, cwd=cwd)


def blimp_fixture(root: Path) -> Path:
    """Two paradigms in BLiMP's jsonl format, in the corpus's words."""
    root.mkdir()
    for uid, field in (("agreement_1", "morphology"), ("island_1", "syntax")):
        rows = [{"sentence_good": f"w1 w{i} w2 w3", "sentence_bad": f"w3 w{i} w1 w2",
                 "field": field, "UID": uid, "pairID": str(i)} for i in range(6)]
        (root / f"{uid}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_glue_path_end_to_end_on_fixtures(corpus, tmp_path):
    glue_fixtures(tmp_path / "glue")
    blimp_fixture(tmp_path / "blimp")
    out = tmp_path / "out"
    # relative paths, as a user types them (fairseq-hydra-train changes directory)
    proc = run_sh("--out", "out", "--corpus", str(corpus), "--glue-dir", "glue",
                  "--blimp-dir", "blimp", "--glue-update-scale", "0.005", "--glue-lr", "1e-4",
                  *TINY, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-5000:]
    columns = json.loads((out / "results.json").read_text())
    assert list(columns) == ["learned", "control"]
    results = columns["learned"]
    expected = {"RTE": {"accuracy"}, "MRPC": {"f1", "accuracy"},
                "STS-B": {"pearson", "spearman"}, "CoLA": {"mcc"}, "SST-2": {"accuracy"}}
    for column in columns.values():  # the control gets the same rows
        assert {t: set(m) - {"seeds"} for t, m in column["glue"].items()} == expected
        for task, metrics in expected.items():
            for m in metrics:
                value = column["glue"][task][m]  # in percent, MCC and correlations too
                assert -100.0 <= value <= 100.0 and value == value
                if m == "accuracy":  # a count of the fixture's 20 dev rows, in percent
                    assert 0.0 <= value <= 100.0 and abs(value / 5 - round(value / 5)) < 1e-6
                elif m == "f1":
                    assert 0.0 <= value <= 100.0
        pretrain = column["pretrain"]
        for split in ("valid", "test"):  # the reference beside the loss, per bucket
            buckets = [b for b in ("", "_top100", "_next900", "_rest")  # non-empty ones
                       if pretrain.get(f"{split}_fixed_mask_share{b}", 1.0) > 0]
            assert buckets[:2] == ["", "_top100"]
            for b in buckets:
                loss = pretrain[f"{split}_fixed_mask_loss{b}"]
                ref = pretrain[f"{split}_fixed_mask_ref_loss{b}"]
                assert 0 < loss < 30 and 0 < ref < 30
                assert abs(pretrain[f"{split}_fixed_mask_below_ref{b}"] - (ref - loss)) < 2e-3
        blimp = column["blimp"]
        assert blimp["pairs"] == 12 and set(blimp["fields"]) == {"morphology", "syntax"}
        assert set(blimp["paradigms"]) == {"agreement_1", "island_1"}
        assert all(a * 6 / 100 * 2 == round(a * 6 / 100 * 2) for a in blimp["paradigms"].values())
    # both columns are scored on the same positions: the same reference
    assert columns["control"]["pretrain"]["test_fixed_mask_ref_loss"] == \
        results["pretrain"]["test_fixed_mask_ref_loss"]
    # an untrained model knows nothing: it is no better than the reference
    assert columns["control"]["pretrain"]["test_fixed_mask_below_ref"] < 0
    table = (out / "results.md").read_text()
    for task, metrics in expected.items():
        for m in metrics:
            assert f"| {task} {m} (median of 1 seeds) |" in table
    for row in ("| fixed-mask loss, test (bits): all tokens | ", "| bits below the reference",
                "| BLiMP accuracy (%), 12 pairs | 50.0 |", "|   syntax | 50.0 |",
                "| | context-free reference | learned | control |"):
        assert row in table
    # the exported predictor is a stock roberta checkpoint: no masker keys
    import torch

    exported = torch.load(out / "learned" / "roberta" / "model.pt", weights_only=True)
    assert exported["cfg"]["model"]["arch"] == "roberta"
    assert not any(k.startswith("masker.") for k in exported["model"])
    assert (out / "learned" / "roberta" / "spm.model").is_file()  # fairseq's bpe= reads it
    for column in ("learned", "control"):  # and the Hugging Face export beside it
        hf = out / column / "hf"
        assert json.loads((hf / "config.json").read_text())["model_type"] == "roberta"
        assert (hf / "model.safetensors").is_file() and (hf / "tokenizer_config.json").is_file()
    assert not (tmp_path / "checkpoints").exists()  # nothing left in the working directory


def test_killed_after_pretraining_resumes_without_redoing_stages(corpus, tmp_path):
    out = tmp_path / "out"
    args = [RUN, "--out", str(out), "--corpus", str(corpus), "--compare", "random",
            "--glue-update-scale", "0.1", *TINY]
    first = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env=RUN_ENV, start_new_session=True)
    done = out / "learned" / "pretrain.done"
    deadline = time.time() + 600
    while not done.exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert done.exists(), "pretraining did not finish"
    os.killpg(first.pid, signal.SIGKILL)  # mid-export or mid-fine-tuning
    first.wait()
    ckpt = out / "learned" / "checkpoints" / "checkpoint_last.pt"
    mtime = ckpt.stat().st_mtime_ns
    second = run_sh(*args[1:])
    assert second.returncode == 0, second.stdout[-5000:]
    for stage in ("corpus", "bpe", "binarize"):
        assert f"=== {stage}: " in second.stdout and "exists, skipped" in \
            second.stdout.split(f"=== {stage}: ")[1].splitlines()[0]
    assert "=== pretrain: amt_tiny, learned masking" not in second.stdout
    assert ckpt.stat().st_mtime_ns == mtime  # not trained again
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"learned", "random", "control"}
    assert set(results["random"]["glue"]) == {"SHUF", "NEXT"}
    third = run_sh(*args[1:])  # everything done: nothing is recomputed
    assert "=== pretrain: amt_tiny" not in third.stdout
    assert ": fine-tune the " not in third.stdout  # no fine-tuning banner
    assert "the same model, randomly initialised" not in third.stdout  # the control is kept
    assert third.stdout.count("blimp.json exists, skipped") == 3


def gpt2_files(d: Path) -> Path:
    """A byte-level GPT-2 BPE with no merges: the real format, a tiny vocabulary."""
    from fairseq.data.encoders.gpt2_bpe_utils import bytes_to_unicode

    d.mkdir()
    symbols = list(bytes_to_unicode().values())
    (d / "encoder.json").write_text(json.dumps({c: i for i, c in enumerate(symbols)}))
    (d / "vocab.bpe").write_text("#version: 0.2\n")
    (d / "dict.txt").write_text("".join(f"{i} {1000 - i}\n" for i in range(len(symbols))))
    return d


def test_gpt2_bpe_path_pretrains_and_exports(corpus, tmp_path):
    out = tmp_path / "out"
    proc = run_sh("--out", str(out), "--corpus", str(corpus), "--bpe", "gpt2", "--gpt2-dir",
                  str(gpt2_files(tmp_path / "gpt2")), "--skip", "glue,evaluate", *TINY)
    assert proc.returncode == 0, proc.stdout[-4000:]
    first = (out / "bpe" / "train.bpe").read_text().split("\n")[0].split()
    assert first and all(x.isdigit() for x in first)  # GPT-2 ids, as fairseq's recipe writes
    assert (out / "bin" / "dict.txt").read_text() == (tmp_path / "gpt2" / "dict.txt").read_text()
    assert (out / "learned" / "roberta" / "model.pt").is_file()
    # BLiMP reads word starts from GPT-2's byte-level symbols; pairs too long for 64
    # positions are left out, and said so
    blimp = json.loads((out / "learned" / "blimp.json").read_text())
    assert blimp["pairs"] > 100 and blimp["skipped_too_long"] > 0


def test_every_masking_strategy_can_run_and_be_compared():
    import sys

    sys.path.insert(0, str(ROOT / "scripts"))
    import pipeline

    from amt_plugin.tasks.adversarial_masked_lm import MASKING_STRATEGIES

    for strategy in MASKING_STRATEGIES:
        others = [s for s in MASKING_STRATEGIES if s != strategy]
        args = pipeline.parse_args(["--masking-strategy", strategy, "--compare", ",".join(others)])
        assert (args.masking_strategy, args.compare) == (strategy, others)
    proc = run_sh("--compare", "random,nonsense")
    assert proc.returncode == 2 and "--compare: unknown strategy nonsense" in proc.stdout


def test_download_from_a_local_file_server(tmp_path):
    import sys

    sys.path.insert(0, str(ROOT / "scripts"))
    import glue

    served = tmp_path / "served"
    fixtures = glue_fixtures(tmp_path / "fixtures")
    served.mkdir()
    with zipfile.ZipFile(served / "RTE.zip", "w") as z:
        for f in ("train.tsv", "dev.tsv"):
            z.write(fixtures / "RTE" / f, f"RTE/{f}")
    header = "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String"
    rows = [f"{i % 2}\t{i}\t{i + 100}\tw{i} w1\tw{i} w2" for i in range(10)]
    (served / "msr_paraphrase_train.txt").write_text("\n".join([header, *rows]) + "\n")
    (served / "msr_paraphrase_test.txt").write_text(header + "\n")
    (served / "mrpc_dev_ids.tsv").write_text("3\t103\n7\t107\n")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        dest = tmp_path / "glue_data"
        glue.download(glue.TASKS["RTE"], dest, url, url)
        glue.download(glue.TASKS["MRPC"], dest, url, url)
    finally:
        server.shutdown()
    assert (dest / "RTE" / "train.tsv").read_text() == (fixtures / "RTE" / "train.tsv").read_text()
    dev = (dest / "MRPC" / "dev.tsv").read_text().splitlines()
    train = (dest / "MRPC" / "train.tsv").read_text().splitlines()
    assert dev[0] == header and [r.split("\t")[1] for r in dev[1:]] == ["3", "7"]
    assert len(train) == 1 + 8
    glue.check_task_dir(glue.TASKS["MRPC"], dest)  # the layout fine-tuning expects


@pytest.mark.parametrize("corpus", ["wikitext-103", "wikitext-2"])
def test_wikitext_download_from_a_local_file_server(tmp_path, corpus):
    import sys

    sys.path.insert(0, str(ROOT / "scripts"))
    import pipeline

    archive = Path(pipeline.CORPORA[corpus][0]).name
    files = pipeline.WIKITEXT_FILES[corpus]
    served = tmp_path / "served"
    served.mkdir()
    with zipfile.ZipFile(served / archive, "w") as z:
        for split, name in files.items():
            z.writestr(f"{corpus}/{name}", f" \n = Heading {split} = \n \n Some {split} text . \n")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    dest = tmp_path / "text"
    dest.mkdir()
    try:  # the first location is down: the mirror is used
        pipeline.fetch_wikitext([f"http://127.0.0.1:{port}/missing/{archive}",
                                 f"http://127.0.0.1:{port}/{archive}"],
                                files, dest, tmp_path / "downloads")
    finally:
        server.shutdown()
    assert (dest / "valid.txt").read_text() == "= Heading valid =\nSome valid text .\n"


def test_changed_settings_do_not_silently_reuse_or_overwrite_a_stage(corpus, tmp_path):
    out = tmp_path / "out"
    (out / "bpe").mkdir(parents=True)
    (out / "bpe.settings.json").write_text(json.dumps({"bpe": "sentencepiece",
                                                       "vocab_size": 120}))
    (out / "bpe" / "spm.model").write_text("made earlier")
    proc = run_sh("--out", str(out), "--corpus", str(corpus), "--vocab-size", "300", "--cpu",
                  timeout=120)
    assert proc.returncode == 2 and "was made with" in proc.stdout, proc.stdout[-2000:]
    assert (out / "bpe" / "spm.model").read_text() == "made earlier"


def test_pretraining_is_not_resumed_under_other_settings(tmp_path):
    out = tmp_path / "out"
    ckpt = out / "learned" / "checkpoints"
    ckpt.mkdir(parents=True)
    (ckpt / "checkpoint_last.pt").write_bytes(b"a run in progress")
    (out / "learned" / "pretrain.settings.json").write_text(
        json.dumps(["amt_tiny", "None", "model.dropout=0.0"]))
    sys.path.insert(0, str(ROOT / "scripts"))
    import pipeline

    args = pipeline.parse_args(["--out", str(out), "--cpu", "--", "model.dropout=0.2"])
    with pytest.raises(pipeline.PipelineError, match="was pretrained with config and overrides"):
        pipeline.stage_pretrain(args, out / "bin", "learned")
    assert (ckpt / "checkpoint_last.pt").read_bytes() == b"a run in progress"


@pytest.mark.parametrize("bad,message", [
    (["--seeds", "0"], "--seeds must be 1 or more"),
    (["--skip", "evaluate,glu"], "--skip: unknown stage glu"),
])
def test_bad_run_sh_flags_fail_before_any_work(bad, message, tmp_path):
    proc = run_sh("--out", str(tmp_path / "out"), *bad, timeout=120)
    assert proc.returncode == 2 and message in proc.stdout, proc.stdout[-2000:]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["missing", "empty", "no_newline", "config", "task",
                                  "glue_files", "gpu", "unwritable"])
def test_bad_inputs_fail_early_with_a_clear_error(case, corpus, tmp_path):
    out = tmp_path / "out"
    args = ["--out", str(out), "--corpus", str(corpus), "--cpu"]
    bad = tmp_path / "bad"
    bad.mkdir()
    if case == "missing":
        args[3], expect = str(tmp_path / "nope"), "neither a known name"
    elif case in ("empty", "no_newline"):
        for split in ("train", "valid", "test"):
            (bad / f"{split}.txt").write_text("w1 w2\n")
        if case == "empty":
            (bad / "valid.txt").write_text("")
            expect = "missing or empty"
        else:
            (bad / "train.txt").write_text("w1 " * 400_000)
            expect = "no newline"
        args[3] = str(bad)
    elif case == "config":
        args += ["--config", "amt_huge"]
        expect = "unknown config 'amt_huge'"
    elif case == "task":
        args += ["--glue", "RTE,FOO", "--glue-dir", str(bad)]
        expect = "unknown task 'FOO'"
    elif case == "glue_files":
        (bad / "RTE").mkdir()
        (bad / "RTE" / "train.tsv").write_text("index\tsentence1\tsentence2\tlabel\n")
        args += ["--glue", "RTE", "--glue-dir", str(bad)]
        expect = "lacks dev.tsv"
    elif case == "gpu":
        args = ["--out", str(out), "--corpus", str(corpus), "--gpus", "1"]
        expect = "--gpus 1 asked for"
    else:
        (tmp_path / "file").write_text("")
        args[1] = str(tmp_path / "file" / "out")
        expect = "not writable"
    proc = run_sh(*args, timeout=120)
    assert proc.returncode == 2, proc.stdout[-3000:]
    assert expect in proc.stdout, proc.stdout[-3000:]
    assert "Traceback" not in proc.stdout
    assert not (out / "text").exists()  # failed before any work
