"""Preemption, time limits, divergence, a dead rank and a crash mid-save: the run stops cleanly or fails fast, and
the last checkpoint stays loadable."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import PYTHON, ROOT, free_port, require, tiny_train_flags
from megalm.pretrain import main as _main
from megalm.training import checkpoint as ckpt


def main(argv):
    return _main([str(a) for a in argv])


def iterations(path):
    if not os.path.exists(path):
        return []
    with open(path) as fh:
        return [json.loads(line)["iteration"] for line in fh if '"loss"' in line]


def spawn_ranks(world, args, env=None):
    """Start ``world`` ranks of ``python -m megalm.pretrain`` directly (RANK/WORLD_SIZE in the environment, as
    a launcher would set them), so the test can signal or kill one rank."""
    port = str(free_port())
    procs = []
    for rank in range(world):
        e = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                 MASTER_PORT=port, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env or {}))
        procs.append(subprocess.Popen([PYTHON, "-m", "megalm.pretrain", *map(str, args)], cwd=ROOT, env=e,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


def wait_for_iteration(path, n, procs, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if len(iterations(path)) >= n:
            return
        if any(p.poll() is not None for p in procs):
            raise AssertionError("a rank exited early:\n" + "\n".join(p.communicate()[0][-2000:] for p in procs))
        time.sleep(0.2)
    raise AssertionError(f"no iteration {n} within {timeout} s")


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM], ids=["USR1", "TERM"])
def test_signal_to_one_rank_stops_all_after_saving(tmp_path, dataset_prefix, bpe_flags, sig):
    metrics, save = tmp_path / "m.jsonl", tmp_path / "ck"
    flags = tiny_train_flags(dataset_prefix, bpe_flags, "--train-iters", "100000", "--eval-interval", "100000",
                             "--metrics-file", metrics, "--save", save)
    procs = spawn_ranks(2, flags)
    wait_for_iteration(metrics, 3, procs)
    procs[1].send_signal(sig)  # only one rank hears it, as when a signal reaches nodes at different times
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    done = iterations(metrics)[-1]
    assert open(save / ckpt.LATEST).read() == str(done)  # both ranks stopped after the same iteration and saved
    assert f"stopping after iteration {done}: signal {sig.name}" in outs[0]
    assert (save / "requeue_requested").exists()
    if sig == signal.SIGTERM:  # the next start resumes from that iteration
        more = tiny_train_flags(dataset_prefix, bpe_flags, "--train-iters", str(done + 1), "--load", save,
                                "--metrics-file", tmp_path / "next.jsonl")
        assert main(more) == 0
        assert iterations(tmp_path / "next.jsonl") == [done + 1]


def test_exit_interval_and_duration(tmp_path, dataset_prefix, bpe_flags):
    flags = tiny_train_flags(dataset_prefix, bpe_flags, "--train-iters", "10", "--save", tmp_path / "a")
    assert main(flags + ["--exit-interval", "3", "--metrics-file", tmp_path / "a.jsonl"]) == 0
    assert iterations(tmp_path / "a.jsonl") == [1, 2, 3]
    assert open(tmp_path / "a" / ckpt.LATEST).read() == "3"
    assert main(flags + ["--load", tmp_path / "a", "--exit-duration-in-mins", "1e-9",
                         "--metrics-file", tmp_path / "b.jsonl"]) == 0
    assert iterations(tmp_path / "b.jsonl") == [4]


def test_divergence_stops_with_the_iteration(tmp_path, dataset_prefix, bpe_flags):
    flags = tiny_train_flags(dataset_prefix, bpe_flags, "--train-iters", "10", "--lr", "1e30", "--clip-grad", "0",
                             "--lr-warmup-iters", "0", "--max-skipped-steps", "1")
    res = subprocess.run([PYTHON, "-m", "megalm.pretrain", *map(str, flags)], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 3, res.stderr[-2000:]
    assert "consecutive steps skipped (more than --max-skipped-steps 1)" in res.stderr
    assert "no checkpoint under --save to roll back to" in res.stderr
    assert "iteration " in res.stderr


CRASH_MID_SAVE = """
import os, sys, time, torch
sys.path.insert(0, {root!r})
from megalm.config import Config
from megalm.parallel.state import Topology
from megalm.training import checkpoint as ckpt
model = torch.nn.Linear(2, 2)
model.vocab_size = 0
cfg = Config()
ckpt.save_checkpoint({save!r}, 1, model, {{}}, cfg, Topology(), {{"consumed_samples": 1}}, {{}})
real_save = torch.save
def slow_save(obj, path, *a, **k):
    real_save(obj, path, *a, **k)
    open({marker!r}, "w").close()
    time.sleep(60)
torch.save = slow_save
ckpt.save_checkpoint({save!r}, 2, model, {{}}, cfg, Topology(), {{"consumed_samples": 2}}, {{}})
"""


def test_kill_during_save_keeps_the_previous_checkpoint(tmp_path):
    save, marker = tmp_path / "ck", tmp_path / "writing"
    code = CRASH_MID_SAVE.format(root=ROOT, save=str(save), marker=str(marker))
    proc = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.time() + 60
    while not marker.exists() and time.time() < deadline:
        time.sleep(0.1)
    assert marker.exists()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert open(save / ckpt.LATEST).read() == "1"
    state = ckpt.read_checkpoint(str(save))  # the pointer leads to a complete, verified checkpoint
    assert state["meta"]["iteration"] == 1 and "weight" in state["model"]
    assert any(d.endswith(".tmp") for d in os.listdir(save))  # the interrupted save never became an iter_ directory
    assert not (save / "iter_0000002").exists()


DEEPSPEED_SLOW_ENGINE_SAVE = """
import os, sys, time
sys.path.insert(0, {root!r})
import deepspeed.runtime.engine as engine
real_save = engine.DeepSpeedEngine.save_checkpoint
calls = []
def slow_save(self, *a, **k):
    real_save(self, *a, **k)
    calls.append(1)
    if len(calls) == 2:  # iteration 2's engine state is written; the rest of the save hangs
        with open({marker!r}, "w") as fh:
            fh.write(str(os.getpid()))
        time.sleep(120)
engine.DeepSpeedEngine.save_checkpoint = slow_save
from megalm.pretrain import main
sys.exit(main(sys.argv[1:]))
"""


def test_kill_during_deepspeed_save_keeps_the_previous_checkpoint(tmp_path, dataset_prefix, bpe_flags):
    """The engine's state is written inside the iteration's temporary directory: killed mid-save, the pointer and
    the previous iteration (with its engine state) are intact and nothing of the interrupted one is visible.
    Failed when the engine wrote to SAVE/deepspeed/ outside the atomic rename."""
    require("deepspeed")
    from conftest import free_port

    save, marker, script = tmp_path / "ck", tmp_path / "writing", tmp_path / "slow.py"
    script.write_text(DEEPSPEED_SLOW_ENGINE_SAVE.format(root=ROOT, marker=str(marker)))
    flags = tiny_train_flags(dataset_prefix, bpe_flags, "--train-iters", "5", "--deepspeed", "--save", save,
                             "--save-interval", "1", "--eval-interval", "100")
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1",
               TORCH_EXTENSIONS_DIR=os.path.join(ROOT, ".venv", "torch_extensions"))
    proc = subprocess.Popen([PYTHON, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port",
                             str(free_port()), str(script), *map(str, flags)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while not (marker.exists() and marker.read_text()) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert marker.exists(), proc.communicate()[0][-3000:] if proc.poll() is not None else "no save in time"
    os.kill(int(marker.read_text()), signal.SIGKILL)
    proc.communicate(timeout=60)
    assert open(save / ckpt.LATEST).read() == "1"
    assert sorted(d for d in os.listdir(save) if not d.endswith(".tmp")) == ["iter_0000001", ckpt.LATEST]
    assert os.path.isdir(save / "iter_0000001" / "deepspeed")
    state = ckpt.read_checkpoint(str(save))
    assert state["meta"]["iteration"] == 1 and any(f.startswith("deepspeed/") for f in state["meta"]["checksums"])


def test_async_save_resumes_exactly(tmp_path, dataset_prefix, bpe_flags):
    """--async-save at DP 2 with ZeRO 1: the checkpoints appear (made visible by every rank together), old ones
    are pruned, and a run resumed from one repeats the uninterrupted run's losses."""
    from conftest import torchrun

    flags = tiny_train_flags(dataset_prefix, bpe_flags, "--train-iters", "6", "--zero-stage", "1",
                             "--eval-interval", "100")
    res = torchrun(2, "megalm/pretrain.py", *flags, "--save", tmp_path / "ck", "--save-interval", "2",
                   "--keep-last-n", "2", "--async-save", "--metrics-file", tmp_path / "full.jsonl")
    assert res.returncode == 0, res.stderr[-3000:]
    assert sorted(os.listdir(tmp_path / "ck")) == ["iter_0000004", "iter_0000006", ckpt.LATEST]
    res = torchrun(2, "megalm/pretrain.py", *flags, "--load", tmp_path / "ck" / "iter_0000004",
                   "--metrics-file", tmp_path / "resumed.jsonl")
    assert res.returncode == 0, res.stderr[-3000:]

    def losses(path):
        return [(r["iteration"], r["loss"], r["grad_norm"]) for r in map(json.loads, open(path)) if "loss" in r]
    assert losses(tmp_path / "resumed.jsonl") == losses(tmp_path / "full.jsonl")[4:]


ASYNC_WRITER_HANGS = """
import os, sys, threading
sys.path.insert(0, {root!r})
import megalm.training.checkpoint as ckpt
real_write = ckpt.PendingSave.write
def write(self):
    if self.iteration >= 4:  # iteration 4's writer never finishes; the training loop goes on meanwhile
        with open({marker!r}, "w") as fh:
            fh.write(str(os.getpid()))
        threading.Event().wait()
    real_write(self)
ckpt.PendingSave.write = write
from megalm.pretrain import main
sys.exit(main(sys.argv[1:]))
"""


def test_kill_during_async_save_keeps_the_previous_checkpoint(tmp_path, dataset_prefix, bpe_flags):
    """The loop trains on while iteration 4's files are being written (it waited only for the host copy);
    killed then, the pointer and iteration 2 are intact, nothing of iteration 4 is visible, and the run resumes."""
    save, marker, script = tmp_path / "ck", tmp_path / "writing", tmp_path / "hang.py"
    script.write_text(ASYNC_WRITER_HANGS.format(root=ROOT, marker=str(marker)))
    flags = tiny_train_flags(dataset_prefix, bpe_flags, "--train-iters", "8", "--save", save, "--save-interval",
                             "2", "--async-save", "--eval-interval", "100", "--metrics-file", tmp_path / "m.jsonl")
    proc = subprocess.Popen([PYTHON, str(script), *map(str, flags)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while not (marker.exists() and max(iterations(tmp_path / "m.jsonl"), default=0) >= 5) and \
            proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert marker.exists() and max(iterations(tmp_path / "m.jsonl")) >= 5, \
        proc.communicate()[0][-3000:] if proc.poll() is not None else "no save in time"
    os.kill(int(marker.read_text()), signal.SIGKILL)
    proc.communicate(timeout=60)
    assert open(save / ckpt.LATEST).read() == "2"
    assert sorted(d for d in os.listdir(save) if not d.endswith(".tmp")) == ["iter_0000002", ckpt.LATEST]
    assert ckpt.read_checkpoint(str(save))["meta"]["iteration"] == 2
    assert main(tiny_train_flags(dataset_prefix, bpe_flags, "--train-iters", "3", "--load", save)) == 0
