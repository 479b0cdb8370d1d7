"""launch/pretrain_gpt.sh under a real single-node Slurm (sbatch, preemption by signal, requeue, resume), and with
stand-in ``srun`` and ``scontrol`` on PATH for machines where Slurm cannot start: the master address from
``scontrol show hostnames``, one task per rank, automatic resume from $SAVE and requeue after an early stop."""
import json
import os
import signal
import stat
import subprocess
import sys
import time

import pytest

from conftest import ROOT, free_port, tiny_train_flags

FAKE_SCONTROL = """#!{python}
import os, sys
with open(os.environ["FAKE_SLURM_LOG"], "a") as fh:
    fh.write("scontrol " + " ".join(sys.argv[1:]) + "\\n")
if sys.argv[1:3] == ["show", "hostnames"]:
    print("localhost")
    print("otherhost")
"""

# srun --kill-on-bad-exit=1 --ntasks-per-node=N CMD...: N local tasks with Slurm's per-task variables
FAKE_SRUN = """#!{python}
import os, subprocess, sys
args = sys.argv[1:]
ntasks = 1
while args and args[0].startswith("--"):
    if args[0].startswith("--ntasks-per-node="):
        ntasks = int(args[0].split("=", 1)[1])
    args = args[1:]
with open(os.environ["FAKE_SLURM_LOG"], "a") as fh:
    fh.write(f"srun {{ntasks}} tasks, MASTER_ADDR={{os.environ.get('MASTER_ADDR')}}\\n")
procs = [subprocess.Popen(args, env=dict(os.environ, SLURM_PROCID=str(i), SLURM_LOCALID=str(i),
                                         SLURM_NTASKS=str(ntasks), SLURM_NODEID="0"))
         for i in range(ntasks)]
sys.exit(max(p.wait() for p in procs))
"""


def install(bin_dir, name, text):
    path = bin_dir / name
    path.write_text(text.format(python=sys.executable))
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_sbatch_script_resumes_and_requeues(tmp_path, dataset_prefix, bpe_flags):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    install(bin_dir, "scontrol", FAKE_SCONTROL)
    install(bin_dir, "srun", FAKE_SRUN)
    log, save = tmp_path / "slurm.log", tmp_path / "ck"
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_SLURM_LOG=str(log),
               SLURM_JOB_ID="4242", SLURM_JOB_NAME="test", SLURM_JOB_NODELIST="node[01-02]", SLURM_NNODES="1",
               SLURM_NTASKS_PER_NODE="2", SAVE=str(save), PYTHON=sys.executable, MEGALM_ROOT=ROOT,
               MASTER_PORT=str(free_port()))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"):
        env.pop(var, None)
    flags = [str(f) for f in tiny_train_flags(dataset_prefix, bpe_flags, "--train-iters", "4", "--exit-interval",
                                               "2")]
    script = os.path.join(ROOT, "launch", "pretrain_gpt.sh")
    first = subprocess.run(["bash", script, *flags], env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    lines = log.read_text().splitlines()
    assert lines[0] == "scontrol show hostnames node[01-02]"
    assert lines[1] == "srun 2 tasks, MASTER_ADDR=localhost"
    assert "layout TP 1 x PP 1 x DP 2" in first.stdout + first.stderr  # two ranks found each other
    assert lines[2] == "scontrol requeue 4242"  # stopped at iteration 2 of 4: requeued
    assert (save / "latest_checkpointed_iteration.txt").read_text() == "2"

    env["MASTER_PORT"] = str(free_port())
    second = subprocess.run(["bash", script, *flags], env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resuming from" in second.stdout and "(iteration 2)" in second.stdout
    assert (save / "latest_checkpointed_iteration.txt").read_text() == "4"
    assert "requeue" not in "".join(log.read_text().splitlines()[3:])  # finished: no second requeue


def read_iterations(path):
    if not os.path.exists(path):
        return []
    with open(path) as fh:
        return [json.loads(line)["iteration"] for line in fh if '"loss"' in line]


def task_pid(job: str, procid: int):
    """The pid of task ``procid`` of Slurm job ``job`` (its environment says which), or None."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as fh:
                env = dict(v.split(b"=", 1) for v in fh.read().split(b"\0") if b"=" in v)
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                cmd = fh.read()
        except OSError:
            continue
        if env.get(b"SLURM_JOB_ID") == job.encode() and env.get(b"SLURM_PROCID") == str(procid).encode() \
                and b"megalm.pretrain" in cmd:
            return int(pid)
    return None


def test_sbatch_under_real_slurm_preempts_requeues_and_finishes(tmp_path, dataset_prefix, bpe_flags):
    """launch/pretrain_gpt.sh submitted with sbatch to a real Slurm (2 tasks), preempted with
    ``scancel --signal=USR1``: both ranks save and exit, the script requeues the job, Slurm starts it again, it
    resumes from the checkpoint; then one rank is stopped (SIGSTOP): the other's watchdog exits with the requeue
    code within the hang timeout, the script requeues again, and the third start resumes from the last save and
    finishes."""
    from slurm_cluster import Cluster, SlurmUnavailable

    cluster, job = Cluster(str(tmp_path / "slurm")), None
    try:
        cluster.start()
    except SlurmUnavailable as exc:
        if os.environ.get("CI") == "true":
            raise
        pytest.skip(f"no Slurm here: {exc}")
    try:
        save, metrics, out = tmp_path / "ck", tmp_path / "m.jsonl", tmp_path / "job.out"
        flags = [str(f) for f in tiny_train_flags(dataset_prefix, bpe_flags, "--train-iters", "300",
                                                   "--eval-interval", "1000", "--log-interval", "50",
                                                   "--metrics-file", metrics, "--save-interval", "5",
                                                   "--hang-timeout-seconds", "10")]
        env = dict(cluster.env, SAVE=str(save), PYTHON=sys.executable, MEGALM_ROOT=ROOT,
                   MASTER_PORT=str(free_port()))
        for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"):
            env.pop(var, None)
        res = subprocess.run(["sbatch", "--parsable", "--nodes", "1", "--ntasks-per-node", "2", "--cpus-per-task",
                              "1", "--output", str(out), os.path.join(ROOT, "launch", "pretrain_gpt.sh"), *flags],
                             env=env, capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert res.returncode == 0, res.stderr
        job = res.stdout.strip().split(";")[0]
        deadline = time.time() + 180
        while len(read_iterations(metrics)) < 3:
            assert time.time() < deadline, cluster.job(job)
            assert cluster.job(job)["JobState"] in ("PENDING", "RUNNING"), out.read_text()[-3000:]
            time.sleep(0.2)
        subprocess.run(["scancel", "--signal=USR1", job], env=env, check=True, timeout=60)
        deadline = time.time() + 180
        while "resuming from" not in out.read_text() or len(read_iterations(metrics)) < 2 + \
                int(out.read_text().split("resuming from")[1].split("(iteration ")[1].split(")")[0]):
            info = cluster.job(job)
            assert time.time() < deadline and info["JobState"] in ("PENDING", "RUNNING", "COMPLETING", "REQUEUED"), \
                (info["JobState"], info.get("Reason"), out.read_text()[-3000:])
            time.sleep(0.2)
        hung = task_pid(job, 1)
        assert hung is not None
        os.kill(hung, signal.SIGSTOP)
        deadline = time.time() + 300
        while (info := cluster.job(job))["JobState"] != "COMPLETED":
            assert time.time() < deadline, (info, out.read_text()[-3000:])
            assert info["JobState"] in ("PENDING", "RUNNING", "COMPLETING", "REQUEUED"), out.read_text()[-3000:]
            time.sleep(1)
        log = out.read_text()
        assert info["Restarts"] == "2" and info["ExitCode"] == "0:0", info
        stopped = int(log.split("stopping after iteration ")[1].split(":")[0])
        assert 3 <= stopped < 300 and "signal SIGUSR1" in log
        assert f"requeueing job {job}" in log and f"resuming from {save} (iteration {stopped})" in log
        assert "rank 0: hang detected" in log and "rank(s) 1 stopped answering" in log
        assert "stopped early (exit code 75" in log or "hang on rank 0" in log
        assert log.count("resuming from") == 2
        assert (save / "latest_checkpointed_iteration.txt").read_text() == "300"
        assert read_iterations(metrics)[-1] == 300 and not (save / "requeue_requested").exists()
    finally:
        if job:
            subprocess.run(["scancel", job], env=cluster.env, timeout=60)
        cluster.stop()
