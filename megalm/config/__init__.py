"""megalm's configuration: one tree of dataclass sections (``model``, ``parallel``, ``optim``, ``data``,
``train``, ``logging``, ``checkpoint``, ``resilience``, ``posttrain``), each in the module named for it with its own
rules; ``layout.py`` holds the rules that span sections and ``loader.py`` reads YAML and flags into the tree. No
torch is imported here.
"""
from megalm.config.data import (MEGATRON_ONLY_TOKENIZERS, TOKENIZER_TYPES, DataConfig, parse_data_path,
                                parse_split, validate_tokenizer)
from megalm.config.fields import ConfigError, opt
from megalm.config.layout import data_parallel_size, num_micro_batches
from megalm.config.loader import (SECTIONS, Config, apply_tree, build_parser, finalize, load_config,
                                  load_yaml, save_yaml, validate)
from megalm.config.model import ModelConfig
from megalm.config.moe import parse_layer_freq
from megalm.config.optim import OptimConfig
from megalm.config.parallel import CP_COMM_TYPES, ParallelConfig
from megalm.config.posttrain import LORA_TARGETS, PostTrainConfig
from megalm.config.resilience import ResilienceConfig
from megalm.config.train import CheckpointConfig, LoggingConfig, TrainConfig

__all__ = ["CP_COMM_TYPES", "LORA_TARGETS", "MEGATRON_ONLY_TOKENIZERS", "SECTIONS", "TOKENIZER_TYPES", "CheckpointConfig", "Config",
           "ConfigError", "DataConfig", "LoggingConfig", "ModelConfig", "OptimConfig", "ParallelConfig", "PostTrainConfig", "ResilienceConfig",
           "TrainConfig",
           "apply_tree", "build_parser", "data_parallel_size", "finalize", "load_config", "load_yaml",
           "num_micro_batches", "opt", "parse_data_path", "parse_layer_freq", "parse_split", "save_yaml", "validate",
           "validate_tokenizer"]
