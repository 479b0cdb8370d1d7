"""Launch environments (torchrun, srun, mpirun) and impossible layouts."""
import pytest

from megalm.config import ConfigError, load_config
from megalm.parallel.state import LayoutError, Topology, launch_environment

NULL = ["--tokenizer-type", "NullTokenizer", "--vocab-size", "100"]


def test_torchrun_environment():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "node0", "MASTER_PORT": "1234"}
    assert launch_environment(env) == {"rank": 3, "world_size": 8, "local_rank": 1, "master_addr": "node0",
                                       "master_port": "1234"}


def test_srun_environment_without_scontrol(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "gpu[003-004]"}
    got = launch_environment(env)
    assert (got["rank"], got["world_size"], got["local_rank"], got["master_addr"]) == (5, 16, 1, "gpu")


def test_srun_environment_uses_scontrol(tmp_path, monkeypatch):
    fake = tmp_path / "scontrol"
    fake.write_text("#!/bin/sh\necho gpu003\necho gpu004\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "gpu[003-004]"}
    assert launch_environment(env)["master_addr"] == "gpu003"


@pytest.mark.parametrize("env", [{"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4"},
                                 {"PMI_RANK": "2", "PMI_SIZE": "4"}])
def test_mpirun_environment(env):
    got = launch_environment(env)
    assert (got["rank"], got["world_size"]) == (2, 4)


def test_single_process_default():
    assert launch_environment({})["world_size"] == 1
    topo = Topology.build(1)
    assert (topo.tp, topo.dp, topo.rank) == (1, 1, 0)


def test_impossible_layouts():
    with pytest.raises(LayoutError, match="world size 1 is not divisible by --tensor-model-parallel-size 2"):
        Topology.build(2)
    with pytest.raises(ConfigError, match="world size 6 is not divisible by --tensor-model-parallel-size 4"):
        load_config([*NULL, "--num-attention-heads", "8", "--tensor-model-parallel-size", "4"], world_size=6)
    with pytest.raises(ConfigError, match="--num-query-groups 2 is not divisible by --tensor-model-parallel-size 4"):
        load_config([*NULL, "--num-attention-heads", "8", "--num-query-groups", "2",
                     "--tensor-model-parallel-size", "4"], world_size=4)
    with pytest.raises(ConfigError, match="--sequence-parallel: --seq-length 30 is not divisible"):
        load_config([*NULL, "--seq-length", "30", "--tensor-model-parallel-size", "4", "--sequence-parallel"],
                     world_size=4)
    cfg = load_config([*NULL, "--tensor-model-parallel-size", "2", "--micro-batch-size", "2"], world_size=8)
    assert cfg.train.global_batch_size == 8  # micro batch x DP 4
