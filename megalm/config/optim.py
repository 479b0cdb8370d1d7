"""The optimizer section: AdamW, the learning-rate schedule, ZeRO sharding, gradient buckets and fp16's loss
scale."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megalm.config.fields import ConfigError, opt, positive, positive_if_set


@dataclass
class OptimConfig:
    lr: float = opt(3e-4, "peak learning rate")
    min_lr: float = opt(0.0, "learning rate at the end of decay")
    lr_decay_style: str = opt("cosine", "decay after warm-up", choices=("constant", "linear", "cosine"))
    lr_warmup_iters: int = opt(0, "iterations of linear warm-up from 0")
    lr_decay_iters: Optional[int] = opt(None, "iterations until --min-lr (default --train-iters)")
    weight_decay: float = opt(0.01, "AdamW weight decay (not applied to biases and norms)")
    clip_grad: float = opt(1.0, "clip the global gradient norm to this (0 disables)")
    adam_beta1: float = opt(0.9, "Adam beta1")
    adam_beta2: float = opt(0.999, "Adam beta2")
    adam_eps: float = opt(1e-8, "Adam epsilon")
    zero_stage: int = opt(0, "shard over data parallelism: 0 nothing, 1 optimizer state, 2 also gradients, "
                          "3 also parameters (with --use-torch-fsdp2 or --deepspeed)", choices=(0, 1, 2, 3))
    use_distributed_optimizer: bool = opt(False, "Megatron's name for --zero-stage 1")
    ddp_bucket_size: int = opt(1 << 22, "parameters per gradient-reduction bucket")
    loss_scale: Optional[float] = opt(None, "static loss scale for --fp16 (default: dynamic)")
    initial_loss_scale: float = opt(2.0 ** 16, "first dynamic loss scale for --fp16")
    loss_scale_window: int = opt(1000, "clean steps before the dynamic loss scale doubles")
    min_loss_scale: float = opt(1.0, "floor of the dynamic loss scale")


def fill_optim_defaults(o: OptimConfig, train_iters: int) -> None:
    if o.lr_decay_iters is None:
        o.lr_decay_iters = train_iters
    if o.use_distributed_optimizer:
        o.zero_stage = max(o.zero_stage, 1)


def validate_optim(o: OptimConfig) -> None:
    if o.lr <= 0 or o.min_lr < 0 or o.min_lr > o.lr:
        raise ConfigError(f"--lr {o.lr} and --min-lr {o.min_lr} must satisfy 0 <= min-lr <= lr, lr > 0")
    if o.lr_warmup_iters < 0:
        raise ConfigError(f"--lr-warmup-iters must be >= 0, got {o.lr_warmup_iters}")
    if o.lr_decay_iters < o.lr_warmup_iters:
        raise ConfigError(f"--lr-decay-iters {o.lr_decay_iters} is smaller than --lr-warmup-iters "
                          f"{o.lr_warmup_iters}")
    positive(o.ddp_bucket_size, "--ddp-bucket-size")
    positive(o.loss_scale_window, "--loss-scale-window")
    positive_if_set([(o.loss_scale, "--loss-scale"), (o.initial_loss_scale, "--initial-loss-scale"),
                     (o.min_loss_scale, "--min-loss-scale")])
    if o.weight_decay < 0 or o.clip_grad < 0:
        raise ConfigError("--weight-decay and --clip-grad must be >= 0")
    if not (0 <= o.adam_beta1 < 1 and 0 <= o.adam_beta2 < 1) or o.adam_eps <= 0:
        raise ConfigError("--adam-beta1/--adam-beta2 must be in [0, 1) and --adam-eps positive")
