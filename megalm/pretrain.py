"""Entry point: ``python -m megalm.pretrain``, ``megalm-pretrain``, ``torchrun megalm/pretrain.py``.

Parse the config, join the process group the launcher set up, build the Trainer, train.
"""
from __future__ import annotations

import logging
import sys
import time

if __package__ in (None, ""):  # run as a script (torchrun megalm/pretrain.py): make the package importable
    import os

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megalm.config import ConfigError, load_config
from megalm.data.gpt_dataset import DatasetError
from megalm.data.indexed import IndexedFormatError
from megalm.data.tokenizers import TokenizerError
from megalm.parallel.state import LayoutError, Topology, destroy_distributed, init_distributed, launch_environment
from megalm.training.checkpoint import CheckpointError
from megalm.training.logging import setup_logging
from megalm.training.stopping import TrainingDiverged, request_requeue
from megalm.training.watchdog import REQUEUE_EXIT, Watchdog

log = logging.getLogger("megalm")

USER_ERRORS = (ConfigError, DatasetError, IndexedFormatError, TokenizerError, LayoutError, CheckpointError,
               FileNotFoundError)


def _is_collective_failure(exc: BaseException) -> bool:
    import torch.distributed as dist

    text = str(exc)
    return isinstance(exc, getattr(dist, "DistError", ())) or (
        isinstance(exc, RuntimeError) and any(k in text for k in ("gloo", "Gloo", "NCCL", "Connection closed",
                                                                   "Timed out", "timed out")))


def main(argv=None) -> int:
    launch = launch_environment()
    setup_logging(launch["rank"])
    try:
        cfg = load_config(argv, world_size=launch["world_size"])
        d = cfg.data
        if not (d.data_path or d.train_data_path or d.sft_data or d.dpo_data):
            raise ConfigError("--data-path is required (a prefix written by megalm-preprocess), or --sft-data / "
                              "--dpo-data for fine-tuning")
    except USER_ERRORS as exc:
        print(f"megalm-pretrain: error: {exc}", file=sys.stderr)
        return 2
    init_distributed(cfg.parallel.distributed_timeout_minutes, single=cfg.parallel.deepspeed)
    multi = launch["world_size"] > 1
    watchdog = Watchdog(cfg.resilience.hang_timeout_seconds, launch["rank"], launch["world_size"],
                        (launch["master_addr"], launch["master_port"]) if multi else None, cfg.checkpoint.save)
    try:
        if cfg.parallel.deepspeed:
            from megalm.training.deepspeed_trainer import DeepSpeedTrainer as Trainer
        else:
            from megalm.training.trainer import Trainer

        p = cfg.parallel
        topo = Topology.build(p.tensor_model_parallel_size, p.sequence_parallel, p.pipeline_model_parallel_size,
                              p.expert_model_parallel_size, experts=bool(cfg.model.num_experts),
                              etp=p.expert_tensor_parallel_size, cp=p.context_parallel_size,
                              cp_comm_type=p.cp_comm_type)
        Trainer(cfg, topo, watchdog).train()
    except USER_ERRORS as exc:
        print(f"megalm-pretrain: error: {exc}", file=sys.stderr)
        destroy_distributed(barrier=False)
        return 2
    except TrainingDiverged as exc:
        print(f"megalm-pretrain: error: {exc}", file=sys.stderr)
        destroy_distributed(barrier=False)
        return 3
    except Exception as exc:
        if not _is_collective_failure(exc):
            destroy_distributed(barrier=False)
            raise
        if watchdog.fired:  # the watchdog reports and exits: the peers that left broke this collective
            time.sleep(3600)
        watchdog.reporting()
        peers = watchdog.describe_peers() if multi else "no other ranks"
        print(f"megalm-pretrain: error: rank {launch['rank']}: communication with the other ranks failed at "
              f"iteration {watchdog.iteration + 1}, {watchdog.phase_name}: {peers} "
              f"({str(exc).strip().splitlines()[0][:300]}); exiting with code {REQUEUE_EXIT} for a requeue",
              file=sys.stderr)
        request_requeue(cfg.checkpoint.save, f"rank {launch['rank']}: communication failed: {peers}")
        watchdog.leave()
        destroy_distributed(barrier=False)
        return REQUEUE_EXIT
    except BaseException:
        destroy_distributed(barrier=False)
        raise
    finally:
        watchdog.stop()  # an in-process caller (a test) keeps no watchdog thread of a finished run
    destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
