"""The configuration tree and how it is filled: YAML file, then command-line flags, then derived defaults, then
each section's validation and the cross-section rules, once.

Every field of every section becomes a flag named after it (``num_layers`` -> ``--num-layers``), which gives
Megatron-LM's names wherever Megatron has the option. A field's ``help`` metadata is the option reference.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

from megalm.config.data import DataConfig, validate_data
from megalm.config.fields import ConfigError
from megalm.config.layout import data_parallel_size, validate_layout
from megalm.config.model import ModelConfig, fill_model_defaults, validate_model
from megalm.config.optim import OptimConfig, fill_optim_defaults, validate_optim
from megalm.config.parallel import ParallelConfig, validate_parallel
from megalm.config.posttrain import PostTrainConfig, validate_posttrain, validate_posttrain_layout
from megalm.config.resilience import ResilienceConfig, validate_resilience
from megalm.config.train import (CheckpointConfig, LoggingConfig, TrainConfig, validate_checkpoint, validate_logging,
                                 validate_train)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    resilience: ResilienceConfig = field(default_factory=ResilienceConfig)
    posttrain: PostTrainConfig = field(default_factory=PostTrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, tree: dict, source: str = "config") -> "Config":
        cfg = cls()
        apply_tree(cfg, tree, source)
        return cfg


SECTIONS = [f.name for f in dataclasses.fields(Config)]


def _flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _base_type(section_cls, f: dataclasses.Field):
    hint = typing.get_type_hints(section_cls)[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if typing.get_origin(hint) is typing.Union else hint


def _coerce(value: Any, typ, where: str):
    if value is None:
        return None
    try:
        if typ is bool:
            if isinstance(value, bool):
                return value
            raise ValueError
        if typ is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if typ is float:
            return float(value)
        if typ is str:
            return str(value)
        if typ is list:
            return [str(v) for v in value] if isinstance(value, (list, tuple)) else str(value).split()
    except (TypeError, ValueError):
        pass
    raise ConfigError(f"{where}: expected {typ.__name__}, got {value!r}")


def apply_tree(cfg: Config, tree: dict, source: str) -> None:
    """Copy a {section: {field: value}} tree onto cfg, rejecting unknown names."""
    if not isinstance(tree, dict):
        raise ConfigError(f"{source}: expected a mapping of sections ({', '.join(SECTIONS)})")
    for section, values in tree.items():
        if section not in SECTIONS:
            raise ConfigError(f"{source}: unknown section '{section}' (known: {', '.join(SECTIONS)})")
        obj = getattr(cfg, section)
        known = {f.name: f for f in dataclasses.fields(obj)}
        for key, value in (values or {}).items():
            if key not in known:
                raise ConfigError(f"{source}: unknown key '{section}.{key}'")
            setattr(obj, key, _coerce(value, _base_type(type(obj), known[key]), f"{source}: {section}.{key}"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megalm-pretrain", description="Train a GPT with megalm.",
                                     argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", help="YAML file with the sections " + ", ".join(SECTIONS))
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # the deepspeed launcher

    for section in SECTIONS:
        section_cls = type(getattr(Config(), section))
        group = parser.add_argument_group(section)
        for f in dataclasses.fields(section_cls):
            typ = _base_type(section_cls, f)
            dest = f"{section}.{f.name}"
            meta = f.metadata
            if typ is bool:
                action = "store_false" if meta.get("negate") else "store_true"
                group.add_argument(_flag(f), dest=dest, action=action, help=meta["help"])
            elif typ is list:
                group.add_argument(_flag(f), dest=dest, nargs=meta.get("nargs") or "+", choices=meta.get("choices"),
                                   help=meta["help"], **({} if meta.get("choices") else {"metavar": f.name.upper()}))
            else:
                group.add_argument(_flag(f), dest=dest, type=typ, choices=meta.get("choices"),
                                   help=meta["help"], metavar=f.name.upper())
    return parser


def load_config(argv: Optional[list] = None, parser: Optional[argparse.ArgumentParser] = None,
                world_size: Optional[int] = None) -> Config:
    """YAML (``--config``), then flags, then derived defaults, then validation."""
    parser = parser or build_parser()
    args = parser.parse_args(argv)
    cfg = Config()
    if getattr(args, "config", None):
        path = args.config
        if not os.path.exists(path):
            raise ConfigError(f"--config: no such file {path}")
        with open(path) as fh:
            try:
                tree = yaml.safe_load(fh) or {}
            except yaml.YAMLError as exc:
                raise ConfigError(f"--config {path}: not valid YAML: {exc}") from None
        apply_tree(cfg, tree, path)
    for dest, value in vars(args).items():
        if "." in dest:
            section, name = dest.split(".", 1)
            setattr(getattr(cfg, section), name, value)
    finalize(cfg, world_size)
    return cfg


def finalize(cfg: Config, world_size: Optional[int] = None) -> Config:
    """Fill derived defaults and validate; every message names the flag and the broken rule."""
    fill_model_defaults(cfg.model)
    fill_optim_defaults(cfg.optim, cfg.train.train_iters)
    validate(cfg, world_size)
    if cfg.train.global_batch_size is None:
        cfg.train.global_batch_size = cfg.train.micro_batch_size * data_parallel_size(cfg, world_size or 1)
    return cfg


def validate(cfg: Config, world_size: Optional[int] = None) -> None:
    """Each section's own rules, then the rules that span sections (``layout.py``)."""
    validate_model(cfg.model)
    validate_parallel(cfg.parallel)
    validate_train(cfg.train)
    validate_logging(cfg.logging)
    validate_optim(cfg.optim)
    validate_data(cfg.data)
    validate_checkpoint(cfg.checkpoint)
    validate_resilience(cfg.resilience)
    validate_posttrain(cfg.posttrain)
    validate_layout(cfg, world_size)
    validate_posttrain_layout(cfg)


def save_yaml(cfg: Config, path: str) -> None:
    with open(path, "w") as fh:
        yaml.safe_dump(cfg.to_dict(), fh, sort_keys=False)


def load_yaml(path: str) -> Config:
    with open(path) as fh:
        return Config.from_dict(yaml.safe_load(fh) or {}, path)
