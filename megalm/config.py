"""One typed configuration tree: YAML file, then command-line flags, validated once.

Every field of every section becomes a flag named after it (``num_layers`` -> ``--num-layers``), which gives
Megatron-LM's names wherever Megatron has the option. A field's ``help`` metadata is the option reference.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml


from megalm.config_fields import ConfigError, opt  # noqa: F401  (re-exported: callers import them from here)
from megalm.config_moe import MoEOptions, validate_moe
from megalm.config_attention import AttentionOptions, validate_attention
from megalm.config_parallel import CP_COMM_TYPES, validate_context_parallel, validate_pipeline


TOKENIZER_TYPES = ("GPT2BPETokenizer", "SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer",
                   "HuggingFaceTokenizer", "NullTokenizer")
# Megatron-LM's other --tokenizer-type names: accepted by the parser so that the error names what is missing
MEGATRON_ONLY_TOKENIZERS = ("TikTokenizer", "BertWordPieceLowerCase", "BertWordPieceCase", "MultimodalTokenizer",
                            "Llama3Tokenizer", "MistralTokenizer")


@dataclass
class ModelConfig(MoEOptions, AttentionOptions):
    num_layers: int = opt(2, "transformer layers")
    hidden_size: int = opt(64, "model width")
    ffn_hidden_size: Optional[int] = opt(None, "MLP width (default 4*hidden, or Megatron's 2/3 of that with --swiglu)")
    num_attention_heads: int = opt(4, "attention heads")
    num_query_groups: Optional[int] = opt(None, "key/value heads for grouped-query attention (default: one per head)")
    seq_length: int = opt(128, "tokens per training sample")
    max_position_embeddings: Optional[int] = opt(None, "learned position table size (default --seq-length)")
    position_embedding_type: str = opt("learned_absolute", "position encoding", choices=("learned_absolute", "rope"))
    rotary_base: float = opt(10000.0, "RoPE base frequency")
    normalization: str = opt("LayerNorm", "normalization layer", choices=("LayerNorm", "RMSNorm"))
    norm_epsilon: float = opt(1e-5, "epsilon of the normalization layers")
    swiglu: bool = opt(False, "SwiGLU MLP instead of GELU")
    qk_layernorm: bool = opt(False, "normalise each head's queries and keys (--normalization's kind) before RoPE "
                             "(Qwen3, OLMo 2)")
    kv_channels: Optional[int] = opt(None, "width of each attention head (default --hidden-size / "
                                     "--num-attention-heads)")
    gelu_approximation: str = opt("none", "GELU of the MLP: exact (none) or the tanh approximation of GPT-2 "
                                  "(transformers' gelu_new, Megatron's --openai-gelu)", choices=("none", "tanh"))
    untie_embeddings_and_output_weights: bool = opt(False, "separate output layer instead of the embedding matrix")
    add_bias_linear: bool = opt(True, "no biases in linear layers", flag="--disable-bias-linear", negate=True)
    hidden_dropout: float = opt(0.0, "dropout after attention and MLP")
    attention_dropout: float = opt(0.0, "dropout on attention probabilities")
    init_method_std: float = opt(0.02, "std of the normal weight initialisation")
    make_vocab_size_divisible_by: int = opt(128, "pad the vocabulary to a multiple of this (times TP)")
    recompute_granularity: Optional[str] = opt(None, "recompute activations in backward: whole layers (full) or "
                                               "only the attention core (selective)", choices=("full", "selective"))
    recompute_method: str = opt("uniform", "with full: checkpoint groups of --recompute-num-layers layers (uniform) "
                                "or only the first --recompute-num-layers layers (block)", choices=("uniform", "block"))
    recompute_num_layers: int = opt(1, "layers per recomputed group (uniform) or recomputed layers (block)")
    attention_backend: str = opt("sdpa", "attention implementation: torch scaled_dot_product_attention (flash on "
                                 "GPU), matmuls around megalm's fused scale-mask-softmax kernel, or the plain "
                                 "matmul-softmax-matmul reference", choices=("sdpa", "fused", "unfused"))

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = opt(1, "ranks that split each layer")
    distributed_timeout_minutes: float = opt(10.0, "a collective waiting longer than this fails (a dead or hung "
                                             "rank), ending the job instead of hanging it")
    sequence_parallel: bool = opt(False, "split norms, dropout and activations between blocks along the sequence "
                                  "over the TP ranks (no effect at TP 1)")
    pipeline_model_parallel_size: int = opt(1, "pipeline stages that split the layers")
    num_layers_per_virtual_pipeline_stage: Optional[int] = opt(None, "interleaved 1F1B: layers per virtual stage "
                                                               "(each rank holds several non-adjacent chunks)")
    deepspeed: bool = opt(False, "train with DeepSpeed's engine (launch with the deepspeed launcher or torchrun)")
    deepspeed_config: Optional[str] = opt(None, "DeepSpeed JSON config to add to the one rendered from the flags",
                                          flag="--deepspeed_config")
    pipeline_stage_layers: list = opt([], "uneven pipeline split: layers of each stage, e.g. 3 3 2 (default: "
                                      "--num-layers / --pipeline-model-parallel-size each)", nargs="+")
    context_parallel_size: int = opt(1, "ranks that split each sequence (CP), between TP and DP in the rank order; "
                                     "each holds chunks i and 2 CP - 1 - i")
    cp_comm_type: list = opt(["allgather"], "how context-parallel attention sees the other ranks' keys and values: "
                             "all-gathered (allgather), passed round a ring while blocks are computed (p2p), or "
                             "heads exchanged for sequence with all-to-all (a2a, Ulysses); one, or one per layer",
                             nargs="+", choices=CP_COMM_TYPES)
    expert_model_parallel_size: int = opt(1, "ranks that split the experts of each MoE layer (EP); experts fold "
                                          "onto the ranks attention uses, as ETP x EP x expert-DP")
    expert_tensor_parallel_size: int = opt(1, "ranks that split each expert's width (ETP), innermost of the "
                                           "expert ranks")

    @property
    def model_parallel_size(self) -> int:
        """Ranks of one data-parallel replica: TP x CP x PP."""
        return self.tensor_model_parallel_size * self.context_parallel_size * self.pipeline_model_parallel_size


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
                          "3 also parameters (with --deepspeed)", choices=(0, 1, 2, 3))
    use_distributed_optimizer: bool = opt(False, "Megatron's name for --zero-stage 1")
    ddp_bucket_size: int = opt(1 << 22, "parameters per gradient-reduction bucket")
    loss_scale: Optional[float] = opt(None, "static loss scale for --fp16 (default: dynamic)")
    initial_loss_scale: float = opt(2.0 ** 16, "first dynamic loss scale for --fp16")
    loss_scale_window: int = opt(1000, "clean steps before the dynamic loss scale doubles")
    min_loss_scale: float = opt(1.0, "floor of the dynamic loss scale")


@dataclass
class DataConfig:
    data_path: list = opt([], "dataset prefix, or weight prefix pairs to blend: 0.3 A 0.7 B", nargs="+")
    train_data_path: list = opt([], "training data only (prefix, or weight prefix pairs); replaces --data-path and "
                                "--split for training", nargs="+")
    valid_data_path: list = opt([], "validation data only, like --train-data-path", nargs="+")
    split: str = opt("969,30,1", "train,valid,test proportions of the documents")
    tokenizer_type: str = opt("GPT2BPETokenizer", "tokenizer (Megatron's names and semantics; README lists which "
                              "Megatron-LM version each matches)", choices=TOKENIZER_TYPES + MEGATRON_ONLY_TOKENIZERS)
    tokenizer_model: Optional[str] = opt(None, "SentencePiece .model, or tokenizer.json / its directory")
    sentencepiece_legacy_specials: bool = opt(False, "SentencePieceTokenizer as Megatron-LM's older "
                                              "_SentencePieceTokenizer (core_v0.9 .. 2025): <CLS> <SEP> <EOD> <MASK> "
                                              "(and <PAD> <BOS> <EOS> where missing) added after the pieces, "
                                              "documents ended by <EOD>")
    vocab_extra_ids: int = opt(0, "with --sentencepiece-legacy-specials: this many <extra_id_N> tokens added too")
    vocab_file: Optional[str] = opt(None, "GPT-2 BPE vocab.json")
    merge_file: Optional[str] = opt(None, "GPT-2 BPE merges.txt")
    vocab_size: Optional[int] = opt(None, "vocabulary of NullTokenizer (ids 0..N-1; N is the end-of-document id)")
    data_cache_path: Optional[str] = opt(None, "where sample indices are cached (default: beside the data)")
    eod_mask_loss: bool = opt(False, "no loss on positions whose input token is the end-of-document id")
    reset_position_ids: bool = opt(False, "restart position ids after every end-of-document token")
    reset_attention_mask: bool = opt(False, "attention does not cross end-of-document tokens (packed documents)")
    sft_data: Optional[str] = opt(None, "supervised fine-tuning: JSON lines of prompt/response pairs or chat "
                                  "messages (instead of --data-path); loss on responses only, packed documents")


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
    compile: bool = opt(False, "torch.compile each transformer block (GPU runs; the first steps compile)",
                        flag="--torch-compile")
    exit_interval: Optional[int] = opt(None, "save and exit after an iteration that is a multiple of this")
    exit_duration_in_mins: Optional[float] = opt(None, "save and exit once the run has trained this long")
    nonfinite_patience: int = opt(10, "stop after more than this many consecutive steps with a non-finite loss or "
                                  "gradient (each such step is skipped)")


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
    keep_last_n: Optional[int] = opt(None, "delete older checkpoints, keeping this many")
    async_save: bool = opt(False, "write checkpoints in the background: the loop waits only for the host copy of "
                           "each rank's share; the checkpoint appears once every rank has written it")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

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
                                   help=meta["help"])
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
    m, t, o = cfg.model, cfg.train, cfg.optim
    if m.ffn_hidden_size is None:
        m.ffn_hidden_size = int(4 * m.hidden_size * 2 / 3 / 64) * 64 if m.swiglu else 4 * m.hidden_size
        m.ffn_hidden_size = max(m.ffn_hidden_size, 1)
    if m.num_query_groups is None:
        m.num_query_groups = m.num_attention_heads
    if m.max_position_embeddings is None:
        m.max_position_embeddings = m.seq_length
    if o.lr_decay_iters is None:
        o.lr_decay_iters = t.train_iters
    if o.use_distributed_optimizer:
        o.zero_stage = max(o.zero_stage, 1)
    validate(cfg, world_size)
    if t.global_batch_size is None:
        t.global_batch_size = t.micro_batch_size * data_parallel_size(cfg, world_size or 1)
    return cfg


def data_parallel_size(cfg: Config, world_size: int) -> int:
    return max(world_size // cfg.parallel.model_parallel_size, 1)


def num_micro_batches(cfg: Config, world_size: int) -> int:
    """Micro-batches each data-parallel rank runs per optimizer step."""
    t = cfg.train
    return t.global_batch_size // (t.micro_batch_size * data_parallel_size(cfg, world_size))


def _positive(value, flag):
    if value is None or value <= 0:
        raise ConfigError(f"{flag} must be positive, got {value}")


def parse_split(split: str) -> list:
    try:
        parts = [float(s) for s in split.replace("/", ",").split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--split {split!r}: expected comma-separated numbers such as 969,30,1") from None
    if not parts or len(parts) > 3 or any(p < 0 or not math.isfinite(p) for p in parts) or sum(parts) <= 0:
        raise ConfigError(f"--split {split!r}: expected up to three non-negative numbers with a positive sum")
    parts += [0.0] * (3 - len(parts))
    return [p / sum(parts) for p in parts]


def parse_data_path(paths: list, flag: str = "--data-path") -> list:
    """[(weight, prefix), ...] from ``A`` or ``0.3 A 0.7 B``; weights normalised to sum 1."""
    if len(paths) == 1:
        return [(1.0, paths[0])]
    if len(paths) % 2:
        raise ConfigError(f"{flag}: with several datasets give weight-prefix pairs, got {len(paths)} values")
    pairs = []
    for weight, prefix in zip(paths[0::2], paths[1::2]):
        try:
            w = float(weight)
        except ValueError:
            raise ConfigError(f"{flag}: {weight!r} should be the weight before {prefix!r}") from None
        if not (w > 0 and math.isfinite(w)):
            raise ConfigError(f"{flag}: weight {weight} of {prefix} must be positive")
        pairs.append((w, prefix))
    total = sum(w for w, _ in pairs)
    return [(w / total, p) for w, p in pairs]


def validate(cfg: Config, world_size: Optional[int] = None) -> None:
    m, p, t, o, d, lg, ck = cfg.model, cfg.parallel, cfg.train, cfg.optim, cfg.data, cfg.logging, cfg.checkpoint
    for value, flag in [(m.num_layers, "--num-layers"), (m.hidden_size, "--hidden-size"),
                        (m.num_attention_heads, "--num-attention-heads"), (m.num_query_groups, "--num-query-groups"),
                        (m.seq_length, "--seq-length"), (m.ffn_hidden_size, "--ffn-hidden-size"),
                        (m.max_position_embeddings, "--max-position-embeddings"),
                        (m.make_vocab_size_divisible_by, "--make-vocab-size-divisible-by"),
                        (t.micro_batch_size, "--micro-batch-size"), (t.train_iters, "--train-iters"),
                        (t.eval_interval, "--eval-interval"), (lg.log_interval, "--log-interval"),
                        (p.tensor_model_parallel_size, "--tensor-model-parallel-size"),
                        (p.pipeline_model_parallel_size, "--pipeline-model-parallel-size"),
                        (p.context_parallel_size, "--context-parallel-size"),
                        (p.num_layers_per_virtual_pipeline_stage, "--num-layers-per-virtual-pipeline-stage")]:
        if value is None and flag == "--num-layers-per-virtual-pipeline-stage":
            continue
        _positive(value, flag)
    if m.kv_channels is not None:
        _positive(m.kv_channels, "--kv-channels")
    elif m.hidden_size % m.num_attention_heads:
        raise ConfigError(f"--hidden-size {m.hidden_size} is not divisible by --num-attention-heads "
                          f"{m.num_attention_heads}")
    if m.num_attention_heads % m.num_query_groups:
        raise ConfigError(f"--num-attention-heads {m.num_attention_heads} is not divisible by --num-query-groups "
                          f"{m.num_query_groups}")
    if m.position_embedding_type == "rope" and m.head_dim % 2:
        raise ConfigError(f"--position-embedding-type rope needs an even head size; hidden {m.hidden_size} / "
                          f"heads {m.num_attention_heads} = {m.head_dim}")
    if m.position_embedding_type == "learned_absolute" and m.max_position_embeddings < m.seq_length:
        raise ConfigError(f"--max-position-embeddings {m.max_position_embeddings} is smaller than --seq-length "
                          f"{m.seq_length}")
    for value, flag in [(m.hidden_dropout, "--hidden-dropout"), (m.attention_dropout, "--attention-dropout")]:
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"{flag} must be in [0, 1), got {value}")
    if m.init_method_std <= 0:
        raise ConfigError(f"--init-method-std must be positive, got {m.init_method_std}")
    if m.recompute_granularity == "full" and not 1 <= m.recompute_num_layers <= m.num_layers:
        raise ConfigError(f"--recompute-num-layers {m.recompute_num_layers} must be between 1 and --num-layers "
                          f"{m.num_layers}")
    if lg.peak_tflops is not None and lg.peak_tflops <= 0:
        raise ConfigError(f"--peak-tflops must be positive, got {lg.peak_tflops}")
    tp = p.tensor_model_parallel_size
    if m.num_attention_heads % tp:
        raise ConfigError(f"--num-attention-heads {m.num_attention_heads} is not divisible by "
                          f"--tensor-model-parallel-size {tp}")
    if m.num_query_groups % tp:
        raise ConfigError(f"--num-query-groups {m.num_query_groups} is not divisible by "
                          f"--tensor-model-parallel-size {tp}")
    if m.ffn_hidden_size % tp:
        raise ConfigError(f"--ffn-hidden-size {m.ffn_hidden_size} is not divisible by "
                          f"--tensor-model-parallel-size {tp}")
    if p.sequence_parallel and tp > 1 and m.seq_length % tp:
        raise ConfigError(f"--sequence-parallel: --seq-length {m.seq_length} is not divisible by "
                          f"--tensor-model-parallel-size {tp}")
    if world_size is not None and world_size % p.model_parallel_size:
        raise ConfigError(f"world size {world_size} is not divisible by --tensor-model-parallel-size {tp} x "
                          f"--pipeline-model-parallel-size {p.pipeline_model_parallel_size}"
                          + (f" x --context-parallel-size {p.context_parallel_size}"
                             if p.context_parallel_size > 1 else ""))
    validate_pipeline(cfg)
    validate_context_parallel(cfg)
    validate_moe(m, p, world_size)
    validate_attention(m, p)
    if t.bf16 and t.fp16:
        raise ConfigError("--bf16 and --fp16 are mutually exclusive")
    if t.grad_reduce_in_bf16 and not t.bf16:
        raise ConfigError("--grad-reduce-in-bf16 needs --bf16")
    if t.eval_iters < 0:
        raise ConfigError(f"--eval-iters must be >= 0, got {t.eval_iters}")
    dp = data_parallel_size(cfg, world_size or 1)
    if t.global_batch_size is not None:
        _positive(t.global_batch_size, "--global-batch-size")
        if t.global_batch_size % (t.micro_batch_size * dp):
            raise ConfigError(f"--global-batch-size {t.global_batch_size} is not divisible by --micro-batch-size "
                              f"{t.micro_batch_size} x data-parallel size {dp}")
    if p.num_layers_per_virtual_pipeline_stage is not None:
        gbs = t.global_batch_size or t.micro_batch_size * dp
        micro, pp = gbs // (t.micro_batch_size * dp), p.pipeline_model_parallel_size
        if micro % pp:
            raise ConfigError(f"--num-layers-per-virtual-pipeline-stage: the interleaved schedule needs the "
                              f"micro-batches per step ({micro} = --global-batch-size {gbs} / "
                              f"(--micro-batch-size {t.micro_batch_size} x DP {dp})) to be a multiple of "
                              f"--pipeline-model-parallel-size {pp}")
    if o.lr <= 0 or o.min_lr < 0 or o.min_lr > o.lr:
        raise ConfigError(f"--lr {o.lr} and --min-lr {o.min_lr} must satisfy 0 <= min-lr <= lr, lr > 0")
    if o.lr_warmup_iters < 0:
        raise ConfigError(f"--lr-warmup-iters must be >= 0, got {o.lr_warmup_iters}")
    if o.lr_decay_iters < o.lr_warmup_iters:
        raise ConfigError(f"--lr-decay-iters {o.lr_decay_iters} is smaller than --lr-warmup-iters "
                          f"{o.lr_warmup_iters}")
    _positive(o.ddp_bucket_size, "--ddp-bucket-size")
    _positive(o.loss_scale_window, "--loss-scale-window")
    for value, flag in [(o.loss_scale, "--loss-scale"), (o.initial_loss_scale, "--initial-loss-scale"),
                        (o.min_loss_scale, "--min-loss-scale")]:
        if value is not None:
            _positive(value, flag)
    if o.weight_decay < 0 or o.clip_grad < 0:
        raise ConfigError("--weight-decay and --clip-grad must be >= 0")
    if not (0 <= o.adam_beta1 < 1 and 0 <= o.adam_beta2 < 1) or o.adam_eps <= 0:
        raise ConfigError("--adam-beta1/--adam-beta2 must be in [0, 1) and --adam-eps positive")
    parse_split(d.split)
    validate_tokenizer(d)
    for flag, paths in (("--data-path", d.data_path), ("--train-data-path", d.train_data_path),
                        ("--valid-data-path", d.valid_data_path)):
        for _, prefix in parse_data_path(paths, flag) if paths else []:
            for ext in (".idx", ".bin"):
                if not os.path.exists(prefix + ext):
                    raise ConfigError(f"{flag}: {prefix + ext} does not exist (give the prefix, without "
                                      f".bin/.idx; megalm-preprocess writes PREFIX_text_document.bin/.idx)")
    if d.data_path and (d.train_data_path or d.valid_data_path):
        raise ConfigError("give --data-path (split by --split) or --train-data-path/--valid-data-path, not both")
    if d.valid_data_path and not d.train_data_path:
        raise ConfigError("--valid-data-path needs --train-data-path")
    for value, flag in [(t.exit_interval, "--exit-interval"), (t.exit_duration_in_mins, "--exit-duration-in-mins"),
                        (p.distributed_timeout_minutes, "--distributed-timeout-minutes")]:
        if value is not None:
            _positive(value, flag)
    if t.nonfinite_patience < 0:
        raise ConfigError(f"--nonfinite-patience must be >= 0, got {t.nonfinite_patience}")
    if p.deepspeed and t.grad_reduce_in_bf16:
        raise ConfigError("--grad-reduce-in-bf16 is for megalm's optimizer; --deepspeed keeps the engine's own "
                          "mixed precision (set its reduction dtype in --deepspeed_config)")
    if o.zero_stage == 3 and not p.deepspeed:
        raise ConfigError("--zero-stage 3 (sharded parameters) needs --deepspeed; megalm's own optimizer does 0-2")
    if p.deepspeed and p.pipeline_model_parallel_size > 1:
        raise ConfigError("--deepspeed runs data parallelism (ZeRO 0-3) with optional tensor and sequence "
                          "parallelism: for --pipeline-model-parallel-size > 1 use megalm's own path (drop "
                          "--deepspeed; --zero-stage 1/2 shards the optimizer there)")
    if d.sft_data is not None:
        if not os.path.isfile(d.sft_data):
            raise ConfigError(f"--sft-data: no such file {d.sft_data}")
        if d.data_path:
            raise ConfigError("give --data-path (pretraining) or --sft-data (fine-tuning), not both")
    if p.deepspeed_config and not p.deepspeed:
        raise ConfigError("--deepspeed_config needs --deepspeed")
    if p.deepspeed_config and not os.path.exists(p.deepspeed_config):
        raise ConfigError(f"--deepspeed_config: no such file {p.deepspeed_config}")
    if ck.keep_last_n is not None:
        _positive(ck.keep_last_n, "--keep-last-n")
    if ck.async_save and not ck.save:
        raise ConfigError("--async-save needs --save")
    if ck.async_save and p.deepspeed:
        raise ConfigError("--async-save with --deepspeed: DeepSpeed writes its engine state itself, synchronously")
    if (ck.finetune or ck.no_load_optim or ck.no_load_rng) and not ck.load:
        raise ConfigError("--finetune, --no-load-optim and --no-load-rng need --load")
    if ck.save_interval is not None:
        _positive(ck.save_interval, "--save-interval")
        if not ck.save:
            raise ConfigError("--save-interval needs --save")
    if ck.load and not os.path.isdir(ck.load):
        raise ConfigError(f"--load: no checkpoint directory {ck.load}")


def validate_tokenizer(d: DataConfig) -> None:
    kind = d.tokenizer_type
    model = [("tokenizer_model", "--tokenizer-model")]
    need = {"GPT2BPETokenizer": [("vocab_file", "--vocab-file"), ("merge_file", "--merge-file")],
            "SentencePieceTokenizer": model, "GPTSentencePieceTokenizer": model, "Llama2Tokenizer": model,
            "HuggingFaceTokenizer": model, "NullTokenizer": []}
    if kind in MEGATRON_ONLY_TOKENIZERS:
        raise ConfigError(f"--tokenizer-type {kind} is Megatron-LM's, not implemented by megalm (it has: "
                          f"{', '.join(need)}); a HuggingFaceTokenizer tokenizer.json often serves the same model")
    if kind not in need:
        raise ConfigError(f"--tokenizer-type {kind!r} is unknown (known: {', '.join(need)})")
    for attr, flag in need[kind]:
        path = getattr(d, attr)
        if not path:
            raise ConfigError(f"--tokenizer-type {kind} needs {flag}")
        if not os.path.exists(path):
            raise ConfigError(f"{flag}: {path} does not exist")
    if kind == "NullTokenizer":
        _positive(d.vocab_size, "--vocab-size (NullTokenizer)")
    if (d.sentencepiece_legacy_specials or d.vocab_extra_ids) and kind != "SentencePieceTokenizer":
        raise ConfigError(f"--sentencepiece-legacy-specials and --vocab-extra-ids apply to SentencePieceTokenizer, "
                          f"not {kind}")
    if d.vocab_extra_ids < 0 or (d.vocab_extra_ids and not d.sentencepiece_legacy_specials):
        raise ConfigError("--vocab-extra-ids must be >= 0, and needs --sentencepiece-legacy-specials")


def save_yaml(cfg: Config, path: str) -> None:
    with open(path, "w") as fh:
        yaml.safe_dump(cfg.to_dict(), fh, sort_keys=False)


def load_yaml(path: str) -> Config:
    with open(path) as fh:
        return Config.from_dict(yaml.safe_load(fh) or {}, path)
