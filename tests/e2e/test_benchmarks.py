"""The benchmark scripts run end to end (CPU smoke sizes); they assert nothing about speed."""

import json
import subprocess
import sys

import pytest

from tests.e2e.conftest import ENV, ROOT

pytestmark = pytest.mark.slow


def test_gpu_throughput_script_smoke_run_prints_its_tables(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_throughput.py"),
                           "--smoke", "--numerics", "--profile",
                           "--numerics-jobs", "4",  # side by side, as on a GPU
                           "--json", str(tmp_path / "r.json")],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, env=ENV, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:]
    lines = proc.stdout.splitlines()
    table = lines[lines.index("| run | tokens/s | ratio to stock (same shape) | "
                              "peak memory (GiB) | MFU (of 989 TFLOP/s) | of 790 TFLOP/s | "
                              "train loss at the end (bits) |"):]
    rows = [line for line in table[2:] if line.startswith("| ")][:10]
    assert [r.split(" | ")[0] for r in rows] == [
        "| stock masked_lm tiny fp32", "| AMT amt_tiny fp32", "| AMT amt_tiny bf16",
        "| AMT amt_tiny bf16, gradient norm read in its own update (fairseq's sync)",
        "| AMT amt_tiny bf16 weights", "| AMT amt_tiny bf16 compiled",
        "| AMT amt_tiny bf16 weights compiled", "| AMT amt_tiny bf16 compiled, CUDA graphs",
        "| AMT amt_tiny bf16 weights compiled, CUDA graphs",
        "| AMT amt_tiny bf16, random masking (no masker)"]
    assert rows[0].split(" | ")[2] == "1.00x"
    assert not any("failed" in r for r in rows)
    assert all(float(r.split(" | ")[6].rstrip(" |")) > 0 for r in rows)  # the last window's loss
    assert any(line.startswith("masker's share of step time, tiny shape") for line in lines)
    results = json.loads((tmp_path / "r.json").read_text())
    # each compiled row says what torch.compile did (graphs, recompiles, CUDA-graph skips)
    compiled = [r for r in results["throughput"] if "compiled" in r["run"]]
    assert len(compiled) == 4
    assert all(r["compile"]["counters"]["stats"]["unique_graphs"] > 0 for r in compiled)
    random, learned = results["numerics"]["random"], results["numerics"]["learned"]
    assert random["updates"] == list(range(1, 9)) and len(random["bf16"]) == 8
    assert learned["metric"] == "valid fixed_mask_loss" and len(learned["updates"]) >= 4
    assert all(g is not None for g in (random["max_gap"], learned["max_gap"]))
    profile = results["profiles"]["tiny"]  # benchmarks/step_profile.py's tables
    assert "wall time per update:" in profile and "| predictor |" in profile
    assert "| op (most host time) |" in proc.stdout


def test_gpu_throughput_numerics_compare_cuda_graphs_with_eager(tmp_path):
    # on a CPU --torch-compile-mode reduce-overhead compiles without replaying graphs: this
    # checks the comparison's plumbing and that compiled training tracks eager's
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_throughput.py"),
                           "--smoke", "--numerics-only", "--numerics-compare", "cudagraphs",
                           "--numerics-jobs", "2", "--json", str(tmp_path / "r.json")],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, env=ENV, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "CUDA graphs against eager, both bf16 (weights), amt_tiny, random masking" \
        in proc.stdout
    assert "| update | eager | cudagraphs |" in proc.stdout
    results = json.loads((tmp_path / "r.json").read_text())["numerics"]
    for strategy in ("random", "learned"):
        n = results[strategy]
        assert n["runs"] == ["eager", "cudagraphs"] and len(n["cudagraphs"]) >= 4
        assert n["compile"]["counters"]["stats"]["unique_graphs"] > 0  # it did compile
        assert n["max_gap"] < 0.05, n  # bits; fused kernels round differently, no more
    assert results["learned"]["compile"]["counters"]["stats"]["unique_graphs"] == 3


def test_gpu_throughput_numerics_train_on_the_corpus_given(zipf_data, tmp_path):
    script = [sys.executable, str(ROOT / "benchmarks" / "gpu_throughput.py"), "--smoke",
              "--numerics-only", "--numerics-updates", "4"]
    proc = subprocess.run([*script, "--numerics-data", str(tmp_path)], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, env=ENV, timeout=120)
    assert proc.returncode == 2
    assert "lacks dict.txt, train.bin, train.idx, valid.bin, valid.idx" in proc.stdout
    proc = subprocess.run([*script, "--numerics-data", str(zipf_data),
                           "--json", str(tmp_path / "r.json"), "--corpus-dir",
                           str(tmp_path / "corpora")], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert not any((tmp_path / "corpora").glob("*/bin"))  # no Zipf corpus made in vain
    # its 300 types and fairseq's four specials (the smoke's own corpus has about 500)
    types = 4 + len((zipf_data / "dict.txt").read_text().splitlines())
    for n in json.loads((tmp_path / "r.json").read_text())["numerics"].values():
        assert n["corpus"] == str(zipf_data) and n["dictionary_types"] == types
        assert len(n["fp32"]) >= 2 and n["max_gap"] is not None


def test_gpu_throughput_script_skips_what_its_time_budget_cannot_fit(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_throughput.py"),
                           "--smoke", "--numerics", "--time-budget", "0",
                           "--json", str(tmp_path / "r.json")],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    results = json.loads((tmp_path / "r.json").read_text())
    assert len(results["throughput"]) == 10
    assert all(r["error"].startswith("skipped") for r in results["throughput"])
    assert all("skipped" in n["error"] for n in results["numerics"].values())
    assert proc.stdout.count("| skipped: no time left in --time-budget | | | | | |") == 10


def test_gpu_throughput_batches_as_the_configs_do_with_sample_break_mode_complete(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_throughput.py"),
                           "--smoke", "--rows", "baseline,bf16w_cudagraphs",
                           "--sample-break-mode", "complete", "--corpus-dir", str(tmp_path),
                           "--json", str(tmp_path / "r.json")],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:]
    stock, graphs = json.loads((tmp_path / "r.json").read_text())["throughput"]
    assert stock["kind"] == "baseline" and graphs["kind"] == "bf16w_cudagraphs"
    assert stock["tokens_per_s"] > 0 and graphs["tokens_per_s"] > 0
    for row in (stock, graphs):
        i = row["flags"].index("--sample-break-mode")
        assert row["flags"][i + 1] == "complete"
    # CUDA graphs are recorded per batch shape: lengths padded to a few (stock has no flag)
    assert "--pad-to-multiple" not in stock["flags"]
    assert graphs["flags"][graphs["flags"].index("--pad-to-multiple") + 1] == "32"
    # sentence-like lines, several to a block of 64 tokens
    [train] = tmp_path.glob("zipf-*/train.txt")
    assert max(len(line.split()) for line in train.read_text().splitlines()) <= 60


def test_host_overhead_script_counts_fewer_syncs_for_amt_than_stock():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "host_overhead.py"),
                           "--updates", "5", "--host-updates", "8"], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:]
    counts, host = proc.stdout.split("Host time per update")
    rows = {r.split(" | ")[0][2:]: r.split(" | ") for r in counts.splitlines()
            if r.startswith("| ") and not r.startswith("| run")}
    syncs = {name: float(cols[2]) for name, cols in rows.items()}
    assert syncs["AMT learned, masker trains"] < syncs["stock masked_lm, adam"]
    times = {r.split(" | ")[0][2:]: r.split(" | ") for r in host.splitlines()
             if r.startswith("| ") and not r.startswith("| run")}
    assert times.keys() == rows.keys()
    assert times["stock masked_lm, adam"][2] == "1.00x |"
    assert all(float(cols[1]) > 0 for cols in times.values())


def test_predictor_step_script_times_both_encoders_in_both_precisions():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "predictor_step.py"),
                           "--arch", "amt_tiny", "--batch", "2", "--tokens", "32",
                           "--vocab", "100", "--repeats", "1"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    rows = [line.split(" | ") for line in proc.stdout.splitlines() if line.startswith("| fp32")
            or line.startswith("| bf16")]
    assert [r[0] for r in rows] == ["| fp32", "| bf16"]
    assert all(float(r[1]) > 0 and float(r[2]) > 0 for r in rows)


def test_gpu_throughput_reads_fairseqs_numbers_above_a_million():
    # fairseq's simple log prints numbers with "{:g}": from a million on with an exponent
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_throughput

    log = "\n".join(
        f"2026-11-27 06:01:{i:02d} | INFO | train_inner | epoch 001:     {10 * i} / 625 "
        f"loss={loss}, ppl=1, wps={wps}, ups=33.8, wpb=32768, bsz=64, num_updates={10 * i}"
        for i, (loss, wps) in enumerate([("14.46", "5172.3"), ("13.05", "1.10675e+06"),
                                         ("12.1", "1.0905e+06"), ("11.362", "1.1e+06")], 1))
    assert gpu_throughput.steady_wps(log) == 1.1e6  # the median after the first third
    assert gpu_throughput.parse_log(log, "train_inner", "wps")[1] == (20, 1106750.0)
    assert gpu_throughput.parse_log(log, "train_inner", "loss")[-1] == (40, 11.362)


def test_masking_quality_sensitivity_scores_control_plateau_and_trained(tmp_path):
    from tests.e2e.test_pipeline import TINY, blimp_fixture, corpus_files

    corpus = corpus_files(tmp_path / "corpus")
    blimp = blimp_fixture(tmp_path / "blimp")
    out = tmp_path / "q"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "masking_quality.py"), "--out", str(out),
           "--corpus", str(corpus), "--vocab-size", "120", "--updates", "16",
           "--plateau-update", "8", "--seeds", "2", "--glue", "SHUF", "--blimp-dir", str(blimp),
           "--sensitivity", "--", *TINY[TINY.index("--") + 1:]]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=ENV, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:]
    runs = sorted(p for p in out.glob("amt_tiny_u16*/random_s*") if p.is_dir())
    assert [r.name for r in runs] == ["random_s1", "random_s2"]
    for run_dir in runs:
        kept = [p.name for p in (run_dir / "checkpoints").glob("checkpoint_*_*.pt")]
        assert kept == ["checkpoint_plateau_8.pt"]  # not the other interval checkpoints
        scores = {p: json.loads((run_dir / f"{p}.json").read_text())
                  for p in ("control", "plateau", "trained")}
        for s in scores.values():
            assert {"test_fixed_mask_loss", "test_fixed_mask_ref_loss", "blimp",
                    "SHUF_mcc"} <= set(s)
        # the untrained control knows no context; all three share the reference
        assert scores["control"]["test_fixed_mask_below_ref"] < 0
        assert len({s["test_fixed_mask_ref_loss"] for s in scores.values()}) == 1
    table = (next(out.glob("amt_tiny_u16*")) / "sensitivity.md").read_text()
    assert table.startswith("| metric | control | plateau | trained | trained - plateau |")
    for metric in ("| fixed_mask_loss |", "| fixed_mask_below_ref_next900 |", "| blimp |",
                   "| SHUF_mcc |"):
        assert metric in table
    rows = [r for r in table.splitlines() if r.startswith("| fixed_mask_loss |")]
    assert rows[0].rstrip(" |").endswith(("yes", "no"))
