"""A real single-node Slurm for the launcher test: munge plus slurmctld and slurmd from Debian's slurm-wlm, with a
generated configuration in a temporary directory (clients find it through SLURM_CONF) on ports of their own.

Eight empty files stand in as the node's GPUs, so that ``#SBATCH --gpus-per-node=8`` is accepted. Credentials live 10 s
(``cred_expire``; 120 by default): a requeued job waits that long before Slurm may start it again, and starting it
sooner (``scontrol update StartTime=now``) makes the node refuse it with "Job credential revoked".
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time


class SlurmUnavailable(RuntimeError):
    pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(*cmd, env=None, check=True):
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    if check and res.returncode:
        raise SlurmUnavailable(f"{' '.join(cmd)}: exit {res.returncode}: {res.stderr.strip()[:500]}")
    return res


def _start_munge() -> None:
    if _run("pgrep", "-x", "munged", check=False).returncode == 0:
        return
    key = "/etc/munge/munge.key"
    if not os.path.exists(key):
        os.makedirs("/etc/munge", exist_ok=True)
        with open(key, "wb") as fh:
            fh.write(os.urandom(1024))
    shutil.chown(key, "munge", "munge")
    os.chmod(key, 0o400)
    os.makedirs("/run/munge", exist_ok=True)
    shutil.chown("/run/munge", "munge", "munge")
    _run("runuser", "-u", "munge", "--", "munged", "--force")


CONF = """ClusterName=megalmtest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
SlurmUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
GresTypes=gpu
SlurmdParameters=config_overrides
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} Sockets=1 CoresPerSocket={cpus} ThreadsPerCore=1 RealMemory=1000 Gres=gpu:8
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
"""


class Cluster:
    """Started by ``start``; ``env`` is what clients (sbatch, squeue, scontrol) need; ``stop`` ends the daemons."""

    def __init__(self, directory: str):
        self.dir = directory
        self.env = dict(os.environ, SLURM_CONF=os.path.join(directory, "slurm.conf"))
        self.procs = []

    def start(self, timeout: float = 60.0) -> "Cluster":
        for tool in ("slurmctld", "slurmd", "sbatch", "munged"):
            if shutil.which(tool) is None:
                raise SlurmUnavailable(f"{tool} is not installed (apt-get install slurm-wlm munge)")
        if os.geteuid() != 0:
            raise SlurmUnavailable("starting slurmd needs root")
        _start_munge()
        host = socket.gethostname().split(".")[0]
        d = self.dir
        for sub in ("state", "spool", "gpus"):
            os.makedirs(os.path.join(d, sub), exist_ok=True)
        for i in range(8):
            open(os.path.join(d, "gpus", f"gpu{i}"), "w").close()
        with open(os.path.join(d, "slurm.conf"), "w") as fh:
            fh.write(CONF.format(host=host, d=d, cpus=os.cpu_count() or 1, ctld_port=_free_port(),
                                 d_port=_free_port()))
        with open(os.path.join(d, "gres.conf"), "w") as fh:
            fh.write(f"NodeName={host} Name=gpu File={d}/gpus/gpu[0-7]\n")
        conf = self.env["SLURM_CONF"]
        self.procs.append(subprocess.Popen(["slurmctld", "-D", "-i", "-f", conf], env=self.env,
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        self.procs.append(subprocess.Popen(["slurmd", "-D", "-f", conf, "-N", host], env=self.env,
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.time() + timeout
        while time.time() < deadline:
            if any(p.poll() is not None for p in self.procs):
                raise SlurmUnavailable(f"a Slurm daemon exited; logs in {d}")
            state = _run("sinfo", "-h", "-o", "%T", env=self.env, check=False).stdout.strip()
            if state.startswith("idle"):
                return self
            if state.startswith(("down", "drain", "inval")):
                _run("scontrol", "update", f"nodename={host}", "state=resume", env=self.env, check=False)
            time.sleep(0.5)
        raise SlurmUnavailable(f"the node did not become idle within {timeout:.0f} s; logs in {d}")

    def job(self, job_id: str) -> dict:
        """``scontrol show job`` as a dict (JobState, Restarts, Reason, ...)."""
        out = _run("scontrol", "show", "job", job_id, "-o", env=self.env).stdout
        return dict(f.split("=", 1) for f in out.split() if "=" in f)

    def stop(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
