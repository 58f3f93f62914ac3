"""The comparable yardstick, the baselines, and the tools that show what the masker learned."""

import json
import math
import subprocess
import sys

import pytest

from tests.e2e.conftest import BIN, ENV, PLUGIN, ROOT, json_logs, run, train

pytestmark = pytest.mark.slow

FIXED_KEYS = ["fixed_mask_loss", "fixed_mask_acc"] + [
    f"fixed_mask_{m}_{b}" for b in ("top100", "next900") for m in ("loss", "acc")]


@pytest.fixture(scope="module")
def checkpoint(zipf_data, tmp_path_factory):
    ck = tmp_path_factory.mktemp("ck")
    proc = train(zipf_data, ck, "--max-update", "30", "--masker-warmup-updates", "10",
                 "--masker-collapse-entropy", "100")  # a threshold no masker can pass
    (ck / "train.log").write_text(proc.stdout)  # what plot_masking.py training reads
    return ck / "checkpoint_last.pt", proc.stdout


def validate(data, checkpoint, *extra):
    out = run([str(BIN / "fairseq-validate"), str(data), "--user-dir", PLUGIN,
               "--path", str(checkpoint), "--task", "adversarial_masked_lm", "--cpu",
               "--log-format", "json", *extra])
    return json_logs(out.stdout, "valid")[-1]


def test_fixed_mask_metrics_do_not_depend_on_batch_size_or_workers(zipf_data, checkpoint):
    a = validate(zipf_data, checkpoint[0], "--batch-size", "32", "--num-workers", "0")
    b = validate(zipf_data, checkpoint[0], "--batch-size", "8", "--num-workers", "2")
    for key in FIXED_KEYS:
        assert a[key] == b[key], key
        assert math.isfinite(float(a[key]))
    shares = [float(a[f"fixed_mask_share_{s}"]) for s in ("top100", "next900", "rest")]
    assert abs(sum(shares) - 1.0) < 1e-3


def test_validation_scores_every_block(zipf_data, checkpoint):
    """fairseq's batching drops the last len % --required-batch-size-multiple blocks of a
    split (fairseq issue 5036); the task's datasets keep them, so every block is scored."""
    from amt_plugin.tasks.adversarial_masked_lm import (
        AdversarialMaskedLMConfig,
        AdversarialMaskedLMTask,
    )

    task = AdversarialMaskedLMTask.setup_task(
        AdversarialMaskedLMConfig(data=str(zipf_data), tokens_per_sample=64, seed=1))
    task.load_dataset("valid")
    blocks = len(task.dataset("valid"))
    multiple = next(m for m in (8, 7, 6, 5, 3) if blocks % m)  # one that leaves a remainder
    for batch in ("32", str(multiple)):
        valid = validate(zipf_data, checkpoint[0], "--batch-size", batch,
                         "--required-batch-size-multiple", str(multiple))
        assert float(valid["bsz"]) == blocks  # fairseq-validate: sentences in all


def test_stock_masked_lm_checkpoint_gets_the_same_yardstick(zipf_data, checkpoint, tmp_path):
    run([str(BIN / "fairseq-train"), str(zipf_data), "--task", "masked_lm",
         "--criterion", "masked_lm", "--arch", "roberta", "--encoder-layers", "2",
         "--encoder-embed-dim", "64", "--encoder-ffn-embed-dim", "128",
         "--encoder-attention-heads", "2", "--tokens-per-sample", "64", "--batch-size", "16",
         "--optimizer", "adam", "--lr", "1e-3", "--max-update", "5", "--cpu",
         "--save-dir", str(tmp_path / "stock"), "--no-progress-bar"])
    script = str(ROOT / "scripts" / "evaluate_checkpoint.py")
    results = {}
    for name, path in (("stock", tmp_path / "stock" / "checkpoint_last.pt"),
                       ("amt", checkpoint[0])):
        run([sys.executable, script, str(path), "--data", str(zipf_data),
             "--json", str(tmp_path / f"{name}.json")])
        results[name] = json.loads((tmp_path / f"{name}.json").read_text())
    for key in FIXED_KEYS:
        assert math.isfinite(results["stock"][key])
    # the same positions were scored: the bucket shares coincide exactly
    for bucket in ("top100", "next900", "rest"):
        key = f"fixed_mask_share_{bucket}"
        assert results["stock"][key] == results["amt"][key]
    # and for the AMT checkpoint the script agrees with fairseq-validate
    valid = validate(zipf_data, checkpoint[0], "--batch-size", "16")
    assert abs(results["amt"]["fixed_mask_loss"] - float(valid["fixed_mask_loss"])) < 2e-3


@pytest.mark.parametrize("strategy", ["span", "frequency"])
def test_baseline_strategies_train_through_the_same_criterion(zipf_data, tmp_path, strategy):
    proc = train(zipf_data, tmp_path / "ck", "--max-update", "10", "--masking-strategy",
                 strategy, "--mask-prob", "0.2")
    inner = json_logs(proc.stdout, "train_inner")
    assert all(math.isfinite(float(x["loss"])) for x in inner)
    assert all(abs(float(x["masked_share"]) - 0.2) < 0.01 for x in inner)
    share = sum(float(x["mask_top100_share"]) for x in inner) / len(inner)
    rand = sum(float(x["mask_rand_top100_share"]) for x in inner) / len(inner)
    if strategy == "frequency":  # prefers rare tokens by construction
        assert share < rand - 0.1
    valid = json_logs(proc.stdout, "valid")[-1]
    assert "fixed_mask_loss" in valid


def test_collapse_warning_reaches_the_training_log(checkpoint):
    assert "masker may be collapsing" in checkpoint[1]


def test_highlight_and_plot_scripts_write_their_files(zipf_data, checkpoint, tmp_path):
    ckpt = str(checkpoint[0])
    scripts = ROOT / "scripts"
    html = tmp_path / "masker.html"
    proc = subprocess.run(
        [sys.executable, str(scripts / "show_masker.py"), ckpt, "--data", str(zipf_data),
         "--html", str(html), "--draws", "16", "w1 w2 w3 w40 w200", "w5 w6 w7 w8 w9 w10"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "\033[" in proc.stdout and "w40:" in proc.stdout
    assert html.read_text().count("<span title=\"P(masked)") == 11
    metrics = tmp_path / "m.json"
    run([sys.executable, str(scripts / "evaluate_checkpoint.py"), ckpt, "--data",
         str(zipf_data), "--json", str(metrics)])
    for cmd, out in (
        (["rank", ckpt, "--data", str(zipf_data)], tmp_path / "rank.png"),
        (["training", f"amt={checkpoint[0].parent}"], tmp_path / "training.png"),
        (["buckets", f"amt={metrics}", f"again={metrics}"], tmp_path / "buckets.png"),
        (["curve", f"amt={checkpoint[0].parent / 'train.log'}"], tmp_path / "curve.png"),
    ):
        run([sys.executable, str(scripts / "plot_masking.py"), *cmd, "--out", str(out)])
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000
