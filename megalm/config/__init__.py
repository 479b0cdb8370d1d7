"""megalm's configuration: one tree of dataclass sections (``model``, ``parallel``, ``optim``, ``data``,
``train``, ``logging``, ``checkpoint``), each in the module named for it with its own rules; ``layout.py`` holds
the rules that span sections and ``loader.py`` reads YAML and flags into the tree. No torch is imported here.
"""
from megalm.config.data import (MEGATRON_ONLY_TOKENIZERS, TOKENIZER_TYPES, DataConfig, parse_data_path,  # noqa: F401
                                parse_split, validate_tokenizer)
from megalm.config.fields import ConfigError, opt  # noqa: F401
from megalm.config.layout import data_parallel_size, num_micro_batches  # noqa: F401
from megalm.config.loader import (SECTIONS, Config, apply_tree, build_parser, finalize, load_config,  # noqa: F401
                                  load_yaml, save_yaml, validate)
from megalm.config.model import ModelConfig  # noqa: F401
from megalm.config.moe import parse_layer_freq  # noqa: F401
from megalm.config.optim import OptimConfig  # noqa: F401
from megalm.config.parallel import CP_COMM_TYPES, ParallelConfig  # noqa: F401
from megalm.config.train import CheckpointConfig, LoggingConfig, TrainConfig  # noqa: F401
