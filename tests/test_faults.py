"""Faults at scale, injected through the real entry point at DP 4 (and TP 2 x PP 2): a hung rank, a dead rank (mid
step, mid save, the store's host), a full disk, a damaged checkpoint, a NaN in one rank's gradient, a loss spike,
a slow rank. Each test checks that the job neither hangs nor trains on bad state, that the message names the
rank, file or iteration, and that the resumed run's losses equal the uninterrupted run's bit for bit from the
restore point, losing nothing before the last complete checkpoint."""
import json
import os
import shutil
import signal
import subprocess
import time

import pytest
import torch

from conftest import PYTHON, ROOT, free_port, tiny_train_flags
from megalm.training import checkpoint as ckpt
from megalm.training.checkpoint_dirs import LATEST
from megalm.training.watchdog import REQUEUE_EXIT

ITERS = 8
HANG = 10  # seconds: --hang-timeout-seconds in these tests


def losses(path):
    with open(path) as fh:
        return {row["iteration"]: row["loss"] for row in map(json.loads, fh) if "loss" in row}


def flags(dataset_prefix, bpe_flags, tmp, name, *extra):
    return tiny_train_flags(dataset_prefix, bpe_flags, "--train-iters", ITERS, "--global-batch-size", 8,
                            "--save", tmp / "ck", "--save-interval", 2, "--eval-interval", 1000,
                            "--metrics-file", tmp / f"{name}.jsonl", "--hang-timeout-seconds", HANG,
                            "--lr-decay-iters", ITERS, *extra)  # the schedule of ITERS iterations, however long


def spawn(world, args, faults=""):
    """``world`` ranks of ``python -m megalm.pretrain`` started directly, as srun starts them (one process per
    rank), so that a test can stop or kill one."""
    port = str(free_port())
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
                   MEGALM_FAULTS=faults)
        procs.append(subprocess.Popen([PYTHON, "-m", "megalm.pretrain", *map(str, args)], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


def finish(procs, timeout=180):
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
    return [p.returncode for p in procs], outs


def run(world, args, faults=""):
    codes, outs = finish(spawn(world, args, faults))
    return codes, "\n".join(outs)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, dataset_prefix, bpe_flags):
    """The uninterrupted DP 4 run every fault is compared with: its losses and save directory."""
    tmp = tmp_path_factory.mktemp("reference")
    codes, out = run(4, flags(dataset_prefix, bpe_flags, tmp, "m"))
    assert codes == [0] * 4, out[-3000:]
    return losses(tmp / "m.jsonl"), tmp / "ck"


def resume_matches(tmp, dataset_prefix, bpe_flags, reference, restored: int, name="resumed"):
    """Requeued: the next start loads the last complete checkpoint (``restored``) and its losses equal the
    uninterrupted run's from there."""
    assert int(open(tmp / "ck" / LATEST).read()) == restored
    start = time.time()
    codes, out = run(4, flags(dataset_prefix, bpe_flags, tmp, name, "--load", tmp / "ck"))
    assert codes == [0] * 4, out[-3000:]
    got = losses(tmp / f"{name}.jsonl")
    assert sorted(got) == list(range(restored + 1, ITERS + 1)), out[-2000:]  # nothing before it lost
    assert got == {i: reference[0][i] for i in got}  # bit for bit
    return time.time() - start


def test_hung_rank_ends_every_rank_with_the_requeue_code(tmp_path, dataset_prefix, bpe_flags, reference):
    """SIGSTOP one rank: every live rank reports within the hang timeout where it waits and which rank stopped,
    leaves the requeue marker and exits 75; the requeued run resumes exactly."""
    procs = spawn(4, flags(dataset_prefix, bpe_flags, tmp_path, "m"), "slow@1:arg=300")  # 0.3 s a step
    deadline = time.time() + 120
    while not (tmp_path / "ck" / LATEST).exists() or int(open(tmp_path / "ck" / LATEST).read()) < 4:
        assert time.time() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.01)
    os.kill(procs[2].pid, signal.SIGSTOP)
    stopped = time.time()
    try:
        codes, outs = finish([procs[0], procs[1], procs[3]], timeout=HANG + 60)
        detected = time.time() - stopped
    finally:
        procs[2].kill()
        procs[2].communicate()
    assert codes == [REQUEUE_EXIT] * 3, outs
    assert detected < HANG + 30
    for out in outs:
        assert "hang detected" in out and "rank(s) 2 stopped answering" in out, out[-3000:]
        assert "main thread blocked in" in out and "most recent call first" in out  # and every thread's stack
    assert (tmp_path / "ck" / "requeue_requested").exists()
    saved = int(open(tmp_path / "ck" / LATEST).read())
    ckpt.read_checkpoint(str(tmp_path / "ck"), ())  # the last checkpoint is complete
    (tmp_path / "ck" / "requeue_requested").unlink()
    if saved < ITERS:  # the requeued run: bit for bit the uninterrupted one's from the restore point
        resume_matches(tmp_path, dataset_prefix, bpe_flags, reference, saved)


def test_stuck_rank_is_named_by_the_ranks_waiting_for_it(tmp_path, dataset_prefix, bpe_flags):
    """A live rank stuck outside any collective (a deadlocked data loader, say): the others wait in one and name
    it; it reports where it is stuck; all four exit 75."""
    codes, outs = finish(spawn(4, flags(dataset_prefix, bpe_flags, tmp_path, "m"), "hang@5:rank=2"),
                         timeout=HANG + 60)
    assert codes == [REQUEUE_EXIT] * 4, outs
    for rank, out in enumerate(outs):
        assert f"rank {rank}: hang detected at iteration 5" in out, out[-3000:]
        if rank != 2:
            assert "not in a collective (the others wait for them): rank 2 at in_step" in out, out[-3000:]
    assert "main thread blocked in in_step at" in outs[2] and "drills.py" in outs[2]


@pytest.mark.parametrize("fault,restored,who", [
    ("die@5:rank=3", 4, "rank(s) 3 stopped answering"),  # killed mid-step
    ("die_save@4:rank=0", 2, "rank 0 is stopped or dead"),  # mid-save, and the store's host
], ids=["mid-step", "mid-save-rank0"])
def test_dead_rank_ends_the_job_naming_it_and_resumes(tmp_path, dataset_prefix, bpe_flags, reference, fault,
                                                       restored, who):
    start = time.time()
    codes, outs = finish(spawn(4, flags(dataset_prefix, bpe_flags, tmp_path, "m"), fault))
    dead = int(fault.split("rank=")[1])
    assert codes[dead] == -signal.SIGKILL
    live = [o for r, o in enumerate(outs) if r != dead]
    assert [c for r, c in enumerate(codes) if r != dead] == [REQUEUE_EXIT] * 3, live
    assert time.time() - start < 60 + HANG
    for out in live:
        assert who in out, out[-3000:]
    assert (tmp_path / "ck" / "iter_0000004").exists() == (restored == 4)
    resume_matches(tmp_path, dataset_prefix, bpe_flags, reference, restored)


def test_full_disk_keeps_the_previous_checkpoint_and_training_goes_on(tmp_path, dataset_prefix, bpe_flags,
                                                                     reference):
    codes, out = run(4, flags(dataset_prefix, bpe_flags, tmp_path, "m"), "enospc@4:rank=1")
    assert codes == [0] * 4, out[-3000:]
    assert "writing the checkpoint of iteration 4 failed on rank(s) 1" in out
    assert "No space left on device: '" + str(tmp_path / "ck" / "iter_0000004.tmp") in out  # the file
    assert "the previous checkpoint (" in out and "iter_0000002" in out
    assert not (tmp_path / "ck" / "iter_0000004").exists() and not (tmp_path / "ck" / "iter_0000004.tmp").exists()
    assert losses(tmp_path / "m.jsonl") == reference[0]  # training itself was untouched
    assert open(tmp_path / "ck" / LATEST).read() == str(ITERS)


def test_damaged_checkpoint_falls_back_to_the_newest_complete_one(tmp_path, dataset_prefix, bpe_flags,
                                                                 reference):
    """A file of the newest checkpoint truncated after it was published: the load says which file and which
    checkpoint it took instead, and continues exactly."""
    shutil.copytree(reference[1], tmp_path / "ck")
    victim = tmp_path / "ck" / "iter_0000008" / "model-tp00-pp000.pt"
    with open(victim, "r+b") as fh:
        fh.truncate(os.path.getsize(victim) // 2)
    shutil.rmtree(tmp_path / "ck" / "iter_0000006")  # the next older one is gone too: it takes iteration 4
    # the resumed run's losses equal the uninterrupted run's from iteration 4
    codes, out = run(4, flags(dataset_prefix, bpe_flags, tmp_path, "resumed", "--load", tmp_path / "ck",
                              "--save", tmp_path / "again"))
    assert codes == [0] * 4, out[-3000:]
    assert f"{victim}: checksum mismatch" in out
    assert "loading " + str(tmp_path / "ck" / "iter_0000004") + ", the newest complete checkpoint" in out
    got = losses(tmp_path / "resumed.jsonl")
    assert got == {i: reference[0][i] for i in range(5, ITERS + 1)}


def test_pointer_to_a_missing_directory_and_an_interrupted_resave(tmp_path, dataset_prefix, bpe_flags, reference):
    from megalm.pretrain import main

    shutil.copytree(reference[1], tmp_path / "ck")
    os.replace(tmp_path / "ck" / "iter_0000008", tmp_path / "ck" / "iter_0000008.old")  # a re-save cut short
    one = [str(a) for a in tiny_train_flags(dataset_prefix, bpe_flags, "--train-iters", ITERS + 1,
                                            "--global-batch-size", 8, "--load", tmp_path / "ck",
                                            "--metrics-file", tmp_path / "a.jsonl")]
    assert main(one) == 0
    assert sorted(losses(tmp_path / "a.jsonl")) == [ITERS + 1]  # the old copy of iteration 8 was taken
    shutil.rmtree(tmp_path / "ck" / "iter_0000008.old")
    one[one.index("--metrics-file") + 1] = str(tmp_path / "b.jsonl")
    assert main(one) == 0
    assert sorted(losses(tmp_path / "b.jsonl")) == [7, 8, 9]  # pointer to nothing: iteration 6


def test_nan_in_one_ranks_gradient_skips_that_step_on_every_rank(tmp_path, dataset_prefix, bpe_flags):
    """A NaN in rank 1's gradient at iteration 5 of 10: skipped everywhere, named, and the weights after
    iteration 10 equal those of a run that skipped that batch (``--iterations-to-skip 5``)."""
    base = ["--train-iters", 10, "--save-interval", 100, "--hidden-dropout", 0, "--attention-dropout", 0]
    codes, out = run(4, flags(dataset_prefix, bpe_flags, tmp_path / "a", "m", *base), "nan_grad@5:rank=1")
    assert codes == [0] * 4, out[-3000:]
    assert "iteration 5: rank 1: non-finite gradient in" in out
    assert "iteration 5: step skipped on every rank, weights and optimizer state untouched: non-finite gradient " \
           "on rank(s) 1" in out
    codes, out = run(4, flags(dataset_prefix, bpe_flags, tmp_path / "b", "m", *base, "--iterations-to-skip", 5))
    assert codes == [0] * 4, out[-3000:]
    a, b = (ckpt.read_checkpoint(str(tmp_path / d / "ck"), ("model", "optimizer")) for d in "ab")
    for name, value in a["model"].items():
        assert torch.equal(value, b["model"][name]), name
    for name, state in a["optimizer"].items():
        assert all(torch.equal(v, b["optimizer"][name][k]) for k, v in state.items()), name
    la, lb = losses(tmp_path / "a" / "m.jsonl"), losses(tmp_path / "b" / "m.jsonl")
    assert {i: la[i] for i in range(6, 11)} == {i: lb[i] for i in range(6, 11)}


def test_loss_spike_rolls_back_and_skips_the_data_at_tp2_pp2(tmp_path, dataset_prefix, bpe_flags):
    """A spike at iteration 7 (saves every 2): back to iteration 6, its batch skipped; the run ends equal to one
    told to skip iteration 7's batch (the rollback itself is bit for bit). TP 2 x PP 2."""
    layout = ["--tensor-model-parallel-size", 2, "--pipeline-model-parallel-size", 2, "--train-iters", 10,
              "--global-batch-size", 4]
    spike = ["--loss-spike-factor", 3, "--loss-spike-window", 3]
    codes, out = run(4, flags(dataset_prefix, bpe_flags, tmp_path / "a", "m", *layout, *spike), "spike@7")
    assert codes == [0] * 4, out[-3000:]
    assert "iteration 7: loss spike" in out and "rolled back to iteration 6" in out
    assert "the batches of iterations 7 to 7" in out
    assert json.load(open(tmp_path / "a" / "ck" / "skipped_iterations.json")) == [7]
    codes, out = run(4, flags(dataset_prefix, bpe_flags, tmp_path / "b", "m", *layout, "--iterations-to-skip", 7))
    assert codes == [0] * 4, out[-3000:]
    a, b = (ckpt.read_checkpoint(str(tmp_path / d / "ck"), ("model",))["model"] for d in "ab")
    assert all(torch.equal(v, b[k]) for k, v in a.items())
    rows = [json.loads(line) for line in open(tmp_path / "a" / "m.jsonl")]
    assert [r["iteration"] for r in rows if r.get("skipped_batch")] == [7]


def test_skipped_steps_in_a_row_roll_back_and_skip_the_data(tmp_path, dataset_prefix, bpe_flags, monkeypatch):
    """NaN losses at iterations 5, 6, 7 with --max-skipped-steps 2 (one process): the third in a row rolls back to
    the checkpoint of iteration 6 and skips iteration 7's batch; the run ends equal to one told to skip 5, 6, 7."""
    from megalm.pretrain import main

    def train(name, *extra):
        args = tiny_train_flags(dataset_prefix, bpe_flags, "--train-iters", 10, "--save-interval", 2,
                                "--save", tmp_path / name, "--hidden-dropout", 0, "--attention-dropout", 0,
                                "--metrics-file", tmp_path / f"{name}.jsonl", *extra)
        assert main([str(a) for a in args]) == 0
        return ckpt.read_checkpoint(str(tmp_path / name), ("model", "optimizer"))

    monkeypatch.setenv("MEGALM_FAULTS", "nan_loss@5:arg=3")
    a = train("a", "--max-skipped-steps", 2)
    monkeypatch.delenv("MEGALM_FAULTS")
    b = train("b", "--iterations-to-skip", 5, 6, 7)
    assert all(torch.equal(v, b["model"][k]) for k, v in a["model"].items())
    assert all(torch.equal(v, b["optimizer"][n][k]) for n, st in a["optimizer"].items() for k, v in st.items())
    rows = [json.loads(line) for line in open(tmp_path / "a.jsonl")]
    assert [r["iteration"] for r in rows if r.get("skipped")] == [5, 6, 7]
    assert [r["iteration"] for r in rows if r.get("skipped_batch")] == [7]
    assert json.load(open(tmp_path / "a" / "skipped_iterations.json")) == [7]


def test_straggler_is_named_and_stops_the_run_for_a_requeue(tmp_path, dataset_prefix, bpe_flags):
    args = flags(dataset_prefix, bpe_flags, tmp_path, "m", "--train-iters", 100, "--save-interval", 100,
                 "--log-straggler", "--log-interval", 2, "--straggler-exit-factor", 2,
                 "--straggler-exit-patience", 2)
    codes, out = run(4, args, "slow@1:rank=2:arg=400")
    assert codes == [0] * 4, out[-3000:]
    rows = [json.loads(line) for line in open(tmp_path / "m.jsonl")]
    reports = [r for r in rows if "straggler_rank" in r]
    assert [r["iteration"] for r in reports] == [2, 4] and all(r["straggler_rank"] == 2 for r in reports)
    assert all(r["straggler_slowdown"] > 2 for r in reports)
    assert "stopping after iteration 4: straggler: rank 2" in out
    assert (tmp_path / "ck" / "requeue_requested").exists() and open(tmp_path / "ck" / LATEST).read() == "4"


@pytest.mark.parametrize("change", ["delete", "rewrite"])
def test_dataset_deleted_or_rewritten_under_the_run_stops_it_naming_the_file(tmp_path, dataset_prefix, bpe_flags,
                                                                           change):
    prefix = tmp_path / "data"
    for ext in (".bin", ".idx"):
        shutil.copy(dataset_prefix + ext, str(prefix) + ext)
    args = tiny_train_flags(str(prefix), bpe_flags, "--train-iters", 100_000, "--eval-interval", 100_000,
                            "--metrics-file", tmp_path / "m.jsonl", "--data-cache-path", tmp_path / "cache")
    proc = subprocess.Popen([PYTHON, "-m", "megalm.pretrain", *map(str, args)], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.time() + 120
    while not (tmp_path / "m.jsonl").exists() or len(losses(tmp_path / "m.jsonl")) < 3:
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.1)
    victim = str(prefix) + ".bin"
    if change == "delete":
        os.unlink(victim)
    else:  # the same size, other tokens: only the sample indices would not notice
        data = bytearray(open(victim, "rb").read())
        data[:64] = bytes(64)
        with open(victim + ".new", "wb") as fh:
            fh.write(data)
        os.replace(victim + ".new", victim)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 2, out[-2000:]
    assert f"megalm-pretrain: error: {victim}: " + ("deleted" if change == "delete" else "replaced") in out
