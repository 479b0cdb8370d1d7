"""The DeepSpeed path: ``deepspeed megalm/pretrain.py --deepspeed [--deepspeed_config FILE] ...``.

Same model, data, schedule of learning rates and metrics as the Trainer; DeepSpeed's engine does gradient
accumulation, reduction, clipping, loss scaling and the (ZeRO 0-3) optimizer step. With tensor parallelism (as in
Megatron-DeepSpeed) megalm's TP layers do their own communication and the engine gets megalm's groups as its
``mpu``: it reduces gradients over the data-parallel group only and sums the gradient norm over the TP group,
counting replicated parameters once. Under sequence parallelism the gradients of parameters that see only this
rank's sequence shard (norms) are summed over the TP group in backward, before the engine takes them.

The DeepSpeed config is rendered from megalm's config tree; a file given with ``--deepspeed_config`` adds to it,
and may not contradict the batch sizes. Checkpoints hold megalm's weights (global coordinates: they load into any
layout) plus DeepSpeed's own engine state under ``SAVE/iter_N/deepspeed/`` for exact resume.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os

import torch

from megalm.config import Config, ConfigError
from megalm.optim.optimizer import build_optimizer
from megalm.optim.schedule import learning_rate
from megalm.parallel.layers import sum_sequence_parallel_grads_in_backward
from megalm.training import checkpoint as ckpt
from megalm.training.checkpoint_dirs import prune
from megalm.training.trainer import Trainer

log = logging.getLogger("megalm")

ENGINE_DIR = "deepspeed"  # inside each iter_* directory
BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def render_deepspeed_config(cfg: Config, micro_batches: int) -> dict:
    """DeepSpeed's JSON config from megalm's; a user file's entries win except the batch sizes, which must agree."""
    t, o = cfg.train, cfg.optim
    out = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": micro_batches,
        "gradient_clipping": o.clip_grad,
        "zero_optimization": {"stage": o.zero_stage},
        "zero_allow_untested_optimizer": True,  # megalm hands DeepSpeed torch's AdamW
        "bf16": {"enabled": t.bf16},
        "fp16": {"enabled": t.fp16, "loss_scale": o.loss_scale or 0,
                 "initial_scale_power": int(math.log2(o.initial_loss_scale)),
                 "loss_scale_window": o.loss_scale_window, "min_loss_scale": o.min_loss_scale},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    path = cfg.parallel.deepspeed_config
    if path:
        try:
            with open(path) as fh:
                user = json.load(fh)
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"--deepspeed_config {path}: {exc}") from None
        for key in BATCH_KEYS:
            if key in user and user[key] != "auto" and user[key] != out[key]:
                raise ConfigError(f"--deepspeed_config {path}: {key} is {user[key]}, but megalm's flags give "
                                  f"{out[key]} (--micro-batch-size/--global-batch-size); make them agree or drop it")
        user = {k: v for k, v in user.items() if k not in BATCH_KEYS}
        for key, value in user.items():
            if isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = {**out[key], **value}
            else:
                out[key] = value
    return out


class TopologyMPU:
    """megalm's process groups under the names DeepSpeed's engine asks its ``mpu`` for (Megatron's)."""

    def __init__(self, topo):
        self.topo = topo

    def get_model_parallel_rank(self):
        return self.topo.tp_rank

    def get_model_parallel_world_size(self):
        return self.topo.tp

    def get_model_parallel_group(self):
        return self.topo.tp_group

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_tensor_model_parallel_src_rank(self):
        return self.topo.rank - self.topo.tp_rank

    def get_data_parallel_rank(self):
        return self.topo.dp_rank

    def get_data_parallel_world_size(self):
        return self.topo.dp

    def get_data_parallel_group(self):
        return self.topo.dp_group

    def get_pipeline_model_parallel_world_size(self):
        return 1


def release_shared_memory_names() -> None:
    """DeepSpeed's CPU all-reduce (used when every rank is on one host) backs each rank with a 66 MB file in
    /dev/shm that it never unlinks: every run left them behind until /dev/shm, which is memory, filled up. Once
    ``deepspeed.initialize`` returns, every rank has mapped every peer's file, so after a barrier each rank can
    unlink its own name; the mappings live on until the processes exit, even by kill -9."""
    import torch.distributed as dist

    if not dist.is_initialized() or torch.cuda.is_available():
        return
    dist.barrier()
    name = "_".join(("deepspeed_allreduce_buffer", str(os.getuid()), os.environ.get("MASTER_ADDR", ""),
                     os.environ.get("MASTER_PORT", ""), str(dist.get_rank())))
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join("/dev/shm", name))


class DeepSpeedTrainer(Trainer):
    def build_optimizer(self):
        import deepspeed

        self.ds_config = render_deepspeed_config(self.cfg, self.num_micro)
        self.zero_stage = self.ds_config["zero_optimization"].get("stage", 0)
        tied = not self.cfg.model.untie_embeddings_and_output_weights
        if self.zero_stage == 3 and tied:
            # the output layer reads the embedding matrix outside the embedding module's forward
            deepspeed.zero.register_external_parameter(self.model, self.model.embedding.weight)
        mpu = None
        if self.topo.tp > 1:
            mpu = TopologyMPU(self.topo)
            for p in self.model.parameters():  # what DeepSpeed's norm counts on every TP rank, not just rank 0
                p.tensor_model_parallel = getattr(p, "tp_dim", None) is not None
            sum_sequence_parallel_grads_in_backward(self.model, self.topo)
        self.engine, optimizer, _, _ = deepspeed.initialize(
            model=self.model, optimizer=build_optimizer(self.model, self.cfg.optim), config=self.ds_config,
            mpu=mpu, dist_init_required=False)
        release_shared_memory_names()
        return optimizer

    def log_memory(self) -> None:
        params = sum(p.numel() * p.element_size() for p in self.model.parameters())
        log.info("DeepSpeed engine: ZeRO stage %d over DP %d, TP %d; parameters %.1f MB on this rank",
                 self.zero_stage, self.topo.dp, self.topo.tp, params / 1e6)

    def optimizer_state_bytes(self) -> int:
        inner = getattr(self.optimizer, "optimizer", self.optimizer)
        return sum(t.numel() * t.element_size() for s in inner.state.values() for t in s.values()
                   if torch.is_tensor(t) and t.dim() > 0)

    def parameter_dtype(self) -> torch.dtype:
        return torch.float32  # the engine keeps its own mixed precision: it casts the model for bf16/fp16

    def train_step(self, micro_batches) -> dict:
        self.engine.train()
        lr = learning_rate(self.cfg.optim, self.iteration + 1)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total = torch.zeros(1 + (self.cfg.model.mtp_num_layers or 0), device=self.device)
        for batch in micro_batches:
            with self.timers("forward-backward"):
                loss, reported = self.training_loss(self.engine(**self.model_inputs(batch)), batch)
                self.engine.backward(loss)  # the engine divides by the accumulation steps
            with self.timers("optimizer"):  # the engine's reduction and update, at the last micro-batch
                self.engine.step()
            total += reported / len(micro_batches)
        norm = self.engine.get_global_grad_norm()
        norm = float(norm) if norm is not None else float("nan")
        skipped = bool(getattr(self.optimizer, "overflow", False))
        if self.cfg.train.fp16:
            self.scaler.scale = float(getattr(self.optimizer, "cur_scale", self.scaler.scale))
        return {**self._loss_row(total), "grad_norm": norm, "lr": lr, "skipped": int(skipped)}

    def _gathered(self):
        if self.zero_stage == 3:
            import deepspeed

            return deepspeed.zero.GatheredParameters(list(self.model.parameters()))
        return contextlib.nullcontext()

    def _save(self) -> None:
        """The engine's state goes inside the iteration's temporary directory, so it appears (renamed with the
        rest), and is pruned by --keep-last-n, with its iteration."""
        def engine_state(tmp: str) -> None:
            self.engine.save_checkpoint(tmp, tag=ENGINE_DIR, save_latest=False)

        with self._gathered():
            ckpt.save_checkpoint(self.cfg.checkpoint.save, self.iteration, self.model, {}, self.cfg, self.topo,
                                 self.checkpoint_meta(), self.rng_state(), write_extra=engine_state)
        if self.cfg.checkpoint.keep_last_n and self.topo.rank == 0:
            prune(self.cfg.checkpoint.save, self.cfg.checkpoint.keep_last_n)

    def load(self, path: str, resume: bool = False) -> None:
        state = self.read_loadable(path, parts=())
        engine_dir, tag = state["path"], ENGINE_DIR
        if not os.path.isdir(os.path.join(engine_dir, tag)):  # written before the engine state moved inside
            engine_dir, tag = os.path.join(os.path.dirname(state["path"]), ENGINE_DIR), os.path.basename(state["path"])
        if not os.path.isdir(os.path.join(engine_dir, tag)):
            raise ckpt.CheckpointError(f"{state['path']}: no DeepSpeed engine state ({ENGINE_DIR}/); a checkpoint "
                                       f"from megalm's own path loads without --deepspeed")
        self.engine.load_checkpoint(engine_dir, tag=tag)
        self.restore_progress(state, resume)
