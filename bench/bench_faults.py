"""What each fault costs, through the real entry point at DP 4 (gloo, CPU; one process per rank, as srun starts
them): seconds from the fault to the last rank's exit, seconds from the restart to its first new step (startup
and the checkpoint load included), and the iterations lost (trained before the fault, not in the checkpoint the
restart loads). Faults: a rank stopped (SIGSTOP: a hang), a rank killed mid-step, rank 0 (the store's host)
killed mid-save, a full disk during a save, a NaN in one rank's gradient, a loss spike (rollback), a slow rank.

The fault's moment is when the last step before it appeared in the metrics file (polled every 20 ms), so the
detection time includes up to one step. Targets with a 60 s hang timeout: detection under 90 s, resume under 60 s
plus the load, and at most the iterations since the last save lost.

python bench/bench_faults.py [--hang-timeout 60] [--save-interval 10] [--faults hang die ...]
"""
import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time

from bench_zero import ROOT, dataset, free_port

VOCAB = 8192
FAULTS = ("hang", "die", "die_save_rank0", "enospc", "nan_grad", "spike", "straggler")


def flags(a, prefix: str, work: str, name: str, iters: int) -> list:
    return ["--num-layers", "2", "--hidden-size", "128", "--num-attention-heads", "4", "--seq-length", "128",
            "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", str(iters), "--eval-iters", "0",
            "--data-path", prefix, "--tokenizer-type", "NullTokenizer", "--vocab-size", str(VOCAB - 1),
            "--split", "100,0,0", "--save", os.path.join(work, "ck"), "--save-interval", str(a.save_interval),
            "--metrics-file", os.path.join(work, name + ".jsonl"), "--log-interval", "5",
            "--hang-timeout-seconds", str(a.hang_timeout)]


def spawn(args: list, faults: str = "", world: int = 4) -> list:
    port = str(free_port())
    return [subprocess.Popen([sys.executable, "-m", "megalm.pretrain", *args], cwd=ROOT,
                             env=dict(os.environ, RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r),
                                      MASTER_ADDR="127.0.0.1", MASTER_PORT=port, OMP_NUM_THREADS="1",
                                      MEGALM_FAULTS=faults),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for r in range(world)]


class Watch:
    """The metrics file's iterations and when each first appeared."""

    def __init__(self, path: str):
        self.path, self.seen, self.offset = path, {}, 0

    def poll(self) -> None:
        if not os.path.exists(self.path):
            return
        with open(self.path) as fh:
            fh.seek(self.offset)
            data = fh.read()
        complete = data[:data.rfind("\n") + 1]
        self.offset += len(complete)
        now = time.time()
        for line in complete.splitlines():
            row = json.loads(line)
            if "loss" in row:
                self.seen.setdefault(row["iteration"], now)

    @property
    def last(self) -> int:
        return max(self.seen, default=0)


def wait_exit(procs, watch: Watch, until=None, timeout: float = 600) -> float:
    """Poll until every process has exited (or ``until()`` is true); the time it happened."""
    end = time.time() + timeout
    while time.time() < end:
        watch.poll()
        if until is not None and until():
            return time.time()
        if all(p.poll() is not None for p in procs):
            return time.time()
        time.sleep(0.02)
    for p in procs:
        p.kill()
    raise SystemExit("a run did not end in time")


def pointed(work: str) -> int:
    with open(os.path.join(work, "ck", "latest_checkpointed_iteration.txt")) as fh:
        return int(fh.read())


def resume(a, prefix: str, work: str) -> float:
    """Restart from the save directory; seconds to the first new step."""
    watch = Watch(os.path.join(work, "resumed.jsonl"))
    start = time.time()
    procs = spawn(flags(a, prefix, work, "resumed", a.iters + a.save_interval) + ["--load", os.path.join(work, "ck")])
    wait_exit(procs, watch, until=lambda: watch.seen)
    first = min(watch.seen.values()) - start
    for p in procs:
        p.kill()
        p.wait()
    return first


def measure(a, prefix: str, fault: str) -> dict:
    work = tempfile.mkdtemp(prefix=f"fault-{fault}-")
    watch = Watch(os.path.join(work, "m.jsonl"))
    at = a.save_interval + a.save_interval // 2  # the fault's iteration: half-way to the second save
    drills = {"die": f"die@{at}:rank=3", "die_save_rank0": f"die_save@{2 * a.save_interval}:rank=0",
              "enospc": f"enospc@{a.save_interval}:rank=1", "nan_grad": f"nan_grad@{at}:rank=1",
              "spike": f"spike@{at}", "straggler": "slow@1:rank=2:arg=300"}.get(fault, "")
    extra = {"spike": ["--loss-spike-factor", "3", "--loss-spike-window", "3"],
             "straggler": ["--log-straggler", "--straggler-exit-factor", "2", "--straggler-exit-patience", "2"]}
    procs = spawn(flags(a, prefix, work, "m", a.iters) + extra.get(fault, []), drills)
    row = {"fault": fault}
    if fault == "hang":
        wait_exit(procs, watch, until=lambda: watch.last >= at)
        os.kill(procs[2].pid, signal.SIGSTOP)
        fault_time = time.time()
        end = wait_exit([procs[i] for i in (0, 1, 3)], watch)
        procs[2].kill()
    else:
        end = wait_exit(procs, watch)
        marker = {"die": at - 1, "die_save_rank0": 2 * a.save_interval, "straggler": 1}.get(fault, at)
        fault_time = watch.seen.get(marker, end)  # the last row before the fault (a slow rank: from the start)
    codes = [p.wait() for p in procs]
    row["exit_codes"] = sorted(set(codes))
    row["detect_s"] = round(end - fault_time, 2) if fault in ("hang", "die", "die_save_rank0", "straggler") else 0.0
    reached = watch.last
    if fault in ("hang", "die", "die_save_rank0", "straggler"):
        restored = pointed(work)
        row["lost_iterations"] = reached - restored
        row["resume_s"] = round(resume(a, prefix, work), 2)
    else:  # the run goes on: it loses the steps it skipped, or after a rollback the iterations it discarded
        rows = [json.loads(line) for line in open(os.path.join(work, "m.jsonl"))]
        row["lost_iterations"] = sum(1 for r in rows if r.get("skipped_batch" if fault == "spike" else "skipped"))
        row["resume_s"] = 0.0
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hang-timeout", type=float, default=60)
    ap.add_argument("--save-interval", type=int, default=10)
    ap.add_argument("--iters", type=int, default=40)
    ap.add_argument("--faults", nargs="+", default=list(FAULTS), choices=FAULTS)
    a = ap.parse_args()
    print(f"# bench_faults: DP 4, GPT 2 x 128, --hang-timeout-seconds {a.hang_timeout:g}, --save-interval "
          f"{a.save_interval}; {platform.machine()}, {os.cpu_count()} cores; gloo, one process per rank")
    prefix = dataset(tempfile.mkdtemp(prefix="faults-data-"), VOCAB)
    print("| fault | exit codes | detect and exit (s) | resume to first step (s) | iterations lost |")
    print("|---|---|---|---|---|")
    for fault in a.faults:
        r = measure(a, prefix, fault)
        print(f"| {r['fault']} | {' '.join(map(str, r['exit_codes']))} | {r['detect_s']} | {r['resume_s']} | "
              f"{r['lost_iterations']} |", flush=True)


if __name__ == "__main__":
    main()
