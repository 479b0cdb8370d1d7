"""The sections of a run around the model: the training loop (batch, iterations, precision, exits), logging and
checkpoints, each with its rules."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from megalm.config.fields import ConfigError, opt, positive, positive_if_set


@dataclass
class TrainConfig:
    micro_batch_size: int = opt(4, "samples per forward pass")
    global_batch_size: Optional[int] = opt(None, "samples per optimizer step (default micro batch x DP)")
    train_iters: int = opt(100, "optimizer steps")
    seed: int = opt(1234, "seed of weights, data order and dropout")
    eval_interval: int = opt(100, "iterations between validation runs")
    eval_iters: int = opt(10, "batches per validation run")
    bf16: bool = opt(False, "bfloat16 parameters and compute; fp32 gradient accumulation and reduction, fp32 main "
                     "parameters and Adam state in the optimizer (sharded under ZeRO)")
    fp16: bool = opt(False, "float16 parameters and compute as --bf16, with a dynamic loss scale")
    grad_reduce_in_bf16: bool = opt(False, "with --bf16: gradient buffers accumulate and reduce in bf16 (half "
                                    "the gradient memory and traffic, coarser sums)")
    fp8_format: Optional[str] = opt(None, "FP8 matmuls in the transformer blocks' linear layers (torchao): e4m3 "
                                    "everywhere, or hybrid (e4m3 forward, e5m2 gradients); emulated where the "
                                    "device has no FP8 matmuls", choices=("e4m3", "hybrid"))
    fp8_recipe: str = opt("tensorwise", "with --fp8-format: scaling per tensor (tensorwise), per row (rowwise), or "
                          "per 32-element block (mxfp8)", choices=("tensorwise", "rowwise", "mxfp8"))
    compile: bool = opt(False, "torch.compile each transformer block (inductor: CPU and GPU; the first steps "
                        "compile)",
                        flag="--torch-compile")
    exit_interval: Optional[int] = opt(None, "save and exit after an iteration that is a multiple of this")
    exit_duration_in_mins: Optional[float] = opt(None, "save and exit once the run has trained this long")


@dataclass
class LoggingConfig:
    log_interval: int = opt(10, "iterations between progress lines")
    peak_tflops: Optional[float] = opt(None, "peak dense TFLOP/s of one device, for MFU (default: from a table of "
                                       "known GPUs; none on CPU)")
    tensorboard_dir: Optional[str] = opt(None, "write TensorBoard events here")
    metrics_file: Optional[str] = opt(None, "append one JSON line of metrics per iteration here")
    wandb_project: Optional[str] = opt(None, "log metrics to Weights & Biases under this project (WANDB_MODE=offline "
                                       "writes the run locally)")
    wandb_exp_name: Optional[str] = opt(None, "the W&B run's name")
    wandb_save_dir: Optional[str] = opt(None, "where W&B writes its run directory (default: the working directory)")
    timing_log_level: int = opt(0, "per-step time breakdown in the log and metrics: 0 off, 1 data / forward-backward"
                                " / gradient reduction / optimizer / checkpoint, 2 the same with the device "
                                "synchronised at each boundary", choices=(0, 1, 2))


@dataclass
class CheckpointConfig:
    save: Optional[str] = opt(None, "checkpoint directory to write")
    load: Optional[str] = opt(None, "checkpoint directory to resume from")
    save_interval: Optional[int] = opt(None, "iterations between checkpoints (default: only at the end)")
    no_load_optim: bool = opt(False, "with --load: fresh optimizer state and loss scale")
    no_load_rng: bool = opt(False, "with --load: do not restore the random generators")
    finetune: bool = opt(False, "with --load: weights only, iteration and samples start at 0")
    pretrained_checkpoint: Optional[str] = opt(None, "the model's weights to start from (weights only, as --load "
                                               "--finetune); with --lora-rank the frozen base under the adapters, "
                                               "which --load then resumes")
    keep_last_n: Optional[int] = opt(None, "delete older checkpoints, keeping this many")
    async_save: bool = opt(False, "write checkpoints in the background: the loop waits only for the host copy of "
                           "each rank's share; the checkpoint appears once every rank has written it")


def validate_train(t: TrainConfig) -> None:
    positive(t.micro_batch_size, "--micro-batch-size")
    positive(t.train_iters, "--train-iters")
    positive(t.eval_interval, "--eval-interval")
    if t.bf16 and t.fp16:
        raise ConfigError("--bf16 and --fp16 are mutually exclusive")
    if t.grad_reduce_in_bf16 and not t.bf16:
        raise ConfigError("--grad-reduce-in-bf16 needs --bf16")
    if t.fp8_recipe != "tensorwise" and not t.fp8_format:
        raise ConfigError(f"--fp8-recipe {t.fp8_recipe} needs --fp8-format e4m3 or hybrid")
    if t.eval_iters < 0:
        raise ConfigError(f"--eval-iters must be >= 0, got {t.eval_iters}")
    positive_if_set([(t.global_batch_size, "--global-batch-size"), (t.exit_interval, "--exit-interval"),
                     (t.exit_duration_in_mins, "--exit-duration-in-mins")])


def validate_logging(lg: LoggingConfig) -> None:
    positive(lg.log_interval, "--log-interval")
    if lg.peak_tflops is not None and lg.peak_tflops <= 0:
        raise ConfigError(f"--peak-tflops must be positive, got {lg.peak_tflops}")


def validate_checkpoint(ck: CheckpointConfig) -> None:
    positive_if_set([(ck.keep_last_n, "--keep-last-n")])
    if ck.async_save and not ck.save:
        raise ConfigError("--async-save needs --save")
    if (ck.finetune or ck.no_load_optim or ck.no_load_rng) and not ck.load:
        raise ConfigError("--finetune, --no-load-optim and --no-load-rng need --load")
    if ck.save_interval is not None:
        positive(ck.save_interval, "--save-interval")
        if not ck.save:
            raise ConfigError("--save-interval needs --save")
    if ck.load and not os.path.isdir(ck.load):
        raise ConfigError(f"--load: no checkpoint directory {ck.load}")
    if ck.pretrained_checkpoint and not os.path.isdir(ck.pretrained_checkpoint):
        raise ConfigError(f"--pretrained-checkpoint: no checkpoint directory {ck.pretrained_checkpoint}")
