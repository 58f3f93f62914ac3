"""The benchmark scripts run end to end (CPU smoke sizes); they assert nothing about speed."""

import subprocess
import sys

import pytest

from tests.e2e.conftest import ENV, ROOT

pytestmark = pytest.mark.slow


def test_gpu_throughput_script_smoke_run_prints_its_table():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_throughput.py"),
                           "--smoke"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ")][1:]
    assert [r.split(" | ")[0] for r in rows] == [
        "| stock masked_lm tiny fp32", "| AMT amt_tiny fp32", "| AMT amt_tiny bf16"]
    assert rows[0].split(" | ")[2] == "1.00x"
