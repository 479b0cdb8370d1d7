"""The GPU benchmark scripts run end to end in their CPU smoke mode."""
import subprocess

from conftest import PYTHON, ROOT


def test_mfu_benchmark_smoke():
    res = subprocess.run([PYTHON, "bench/bench_mfu.py", "--smoke"], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "tokens/s" in res.stdout and "median step" in res.stdout


def test_gpu_check_script_smoke(tmp_path):
    """scripts/gpu_check.sh with tiny sizes on CPU: every step of the script itself runs and reports."""
    import os
    import re

    results = tmp_path / "gpu_check.txt"
    res = subprocess.run(["bash", "scripts/gpu_check.sh", str(results)], cwd=ROOT, capture_output=True, text=True,
                         timeout=600, env=dict(os.environ, GPU_CHECK_SMOKE="1", PYTHON=PYTHON))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    text = results.read_text()
    for step in ("train", "training throughput", "bench/bench_mfu.py", "bench/bench_mfu.py --fp8-recipe mxfp8",
                 "generate from the trained checkpoint"):
        assert re.search(rf"^== {re.escape(step)}.*: exit 0, \d+ s$", text, re.M), step
    assert "tokens_per_sec" in text and "--- prompt: '1 2 3 4 5'" in text
    assert text.rstrip().endswith(f"all steps passed; results in {results}")


def test_moe_benchmark_small():
    """bench/bench_moe.py at small sizes: outputs equal transformers' Mixtral block (it asserts so), and expert
    parallelism hands torch.distributed exactly the algorithm's minimum of bytes."""
    res = subprocess.run([PYTHON, "bench/bench_moe.py", "--tokens", "256", "--hidden", "64", "--ffn", "128",
                          "--repeats", "1"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "(a) megalm MoE layer" in res.stdout and "ratio 1.000 (target 1.00)" in res.stdout, res.stdout


def test_latent_cache_benchmark_small():
    """bench/bench_mla_cache.py at small sizes: the latent cache holds (kv_lora_rank + qk_pos_emb_head_dim) x 4
    bytes per token and layer, and decoding from it gives the expanded path's tokens (it asserts both)."""
    res = subprocess.run([PYTHON, "bench/bench_mla_cache.py", "--heads", "4", "--hidden", "64", "--q-lora-rank", "32",
                          "--kv-lora-rank", "32", "--qk-head-dim", "16", "--pos", "8", "--v-head-dim", "16",
                          "--prompt", "16", "--new", "8"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "latent 160 (target (kv_lora_rank + qk_pos_emb_head_dim) x 4 = 160: met)" in res.stdout, res.stdout
    assert "the same tokens: True" in res.stdout


def test_context_parallel_benchmark_small():
    """bench/bench_cp.py at sequence 512: every type at CP 2 and 4 hands torch.distributed exactly the bytes
    README's formula gives, and ring and a2a keep at most 1/CP + 15% of CP 1's saved activations."""
    res = subprocess.run([PYTHON, "bench/bench_cp.py", "--seq", "512", "--repeats", "1"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [line.split() for line in res.stdout.splitlines() if line.split()[:1] in (["2"], ["4"])]
    assert len(rows) == 6, res.stdout
    for cp, kind, saved, share, target, sent, formula, ratio, overlap, seconds in rows:
        assert ratio == "1.000", (cp, kind, res.stdout)
        if kind != "allgather":
            assert float(share) <= float(target), (cp, kind, res.stdout)


def test_checkpoint_benchmark_small():
    """bench/bench_checkpoint.py on a small GPT at DP 2: both modes run through the real entry point and every rank
    writes a share. (How long each blocks is the benchmark's figure for RESULTS.md, not a test: on a shared
    machine a timing comparison fails by chance.)"""
    res = subprocess.run([PYTHON, "bench/bench_checkpoint.py", "--sizes", "2", "--layers", "2", "--hidden", "256"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    row = [line.split() for line in res.stdout.splitlines() if line.split()[:1] == ["2"]][0]
    sync, background, shares = float(row[1]), float(row[2]), row[7:]
    assert sync > 0 and background > 0 and len(shares) == 2 and all(float(s) > 0 for s in shares), res.stdout


def test_fault_benchmark_small():
    """bench/bench_faults.py with a 10 s hang timeout, for a rank killed mid-step and a NaN gradient: a row each,
    the dead rank's run exits 75 and resumes, the NaN run loses the one step it skipped."""
    res = subprocess.run([PYTHON, "bench/bench_faults.py", "--faults", "die", "nan_grad", "--hang-timeout", "10",
                          "--save-interval", "4", "--iters", "12"], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = {r[1].strip(): [c.strip() for c in r[2:-1]] for r in (line.split("|") for line in res.stdout.splitlines())
            if len(r) > 5 and r[1].strip() in ("die", "nan_grad")}
    assert rows["die"][0] == "-9 75" and float(rows["die"][2]) > 0 and rows["die"][3] == "1", res.stdout
    assert rows["nan_grad"][0] == "0" and rows["nan_grad"][3] == "1", res.stdout


def test_race_against_megatron_core_small():
    """bench/bench_vs_megatron.py runs both frameworks at one rank and prints the ratio."""
    res = subprocess.run([PYTHON, "bench/bench_vs_megatron.py", "--layouts", "1", "--shapes", "gpt", "--iters", "3",
                          "--repeats", "1"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "slowest ratio megalm / megatron-core:" in res.stdout and "\ngpt    1 " in res.stdout


def test_lora_benchmark_small():
    """bench/bench_lora.py at small sizes: the LoRA row holds 12 bytes of Adam state and main copy per trained
    parameter and a fraction of full fine-tuning's training state."""
    import re

    res = subprocess.run([PYTHON, "bench/bench_lora.py", "--small", "--dp", "1", "--iters", "3", "--rank", "4"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Adam + main = 12.00 bytes per trained parameter" in res.stdout, res.stdout
    ratio = float(re.search(r"DP 1 LoRA r4\s+[\d,]+(?:\s+[\d.]+){4}\s+([\d.]+)", res.stdout).group(1))
    assert ratio < 0.5, res.stdout
