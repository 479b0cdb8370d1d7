"""The GPU benchmark scripts run end to end in their CPU smoke mode."""
import subprocess

from conftest import PYTHON, ROOT


def test_mfu_benchmark_smoke():
    res = subprocess.run([PYTHON, "bench/bench_mfu.py", "--smoke"], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "tokens/s" in res.stdout and "median step" in res.stdout
