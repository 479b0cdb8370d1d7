"""The post-training section: how fine-tuning data is read (its shape, the chat template), LoRA adapters, and
preference optimisation (DPO), each with its rules. The data files themselves are the data section's
(``--sft-data``, ``--dpo-data``); the base weights the checkpoint section's (``--pretrained-checkpoint``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megalm.config.fields import ConfigError, opt

SFT_FORMATS = ("auto", "messages", "prompt-response", "alpaca", "sharegpt")
# the names users know for megalm's projections: Megatron's (fused in Megatron, one adapter per projection here,
# as PEFT has them) and Hugging Face's; experts' projections answer to the MLP's names
LORA_TARGETS = {
    "linear_qkv": ("wq", "wk", "wv"), "linear_proj": ("wo",), "linear_fc1": ("w1", "w3"), "linear_fc2": ("w2",),
    "q_proj": ("wq",), "k_proj": ("wk",), "v_proj": ("wv",), "o_proj": ("wo",),
    "gate_proj": ("w1",), "up_proj": ("w3",), "down_proj": ("w2",),
    # multi-latent attention (Megatron's names, then DeepSeek's in transformers)
    "linear_q_proj": ("wq",), "linear_q_down_proj": ("wq_a",), "linear_q_up_proj": ("wq_b",),
    "linear_kv_down_proj": ("wkv_a",), "linear_kv_up_proj": ("wkv_b",),
    "q_a_proj": ("wq_a",), "q_b_proj": ("wq_b",), "kv_a_proj_with_mqa": ("wkv_a",), "kv_b_proj": ("wkv_b",),
}
DPO_LOSSES = ("sigmoid", "ipo")


@dataclass
class PostTrainConfig:
    sft_format: str = opt("auto", "shape of --sft-data lines: messages, prompt-response, alpaca or sharegpt (auto: "
                          "told apart line by line)", choices=SFT_FORMATS)
    chat_template: Optional[str] = opt(None, "the chat template conversations are rendered with: a Jinja file, a "
                                       "tokenizer directory, or the name of one of the tokenizer's templates "
                                       "(default: the tokenizer's own, from its tokenizer_config.json or "
                                       "chat_template.jinja)")
    lora_rank: int = opt(0, "train LoRA adapters of this rank on --lora-target-modules, the base model frozen "
                         "(0: off, every weight trains)")
    lora_alpha: float = opt(32.0, "LoRA's scale: each adapter adds alpha / rank x B A x to its layer's output")
    lora_dropout: float = opt(0.0, "dropout on the adapters' input")
    lora_target_modules: list = opt(["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"],
                                    "the projections that get adapters, by Megatron's names (linear_qkv linear_proj "
                                    "linear_fc1 linear_fc2) or Hugging Face's (q_proj k_proj v_proj o_proj gate_proj "
                                    "up_proj down_proj); experts' projections answer to the MLP's names",
                                    nargs="+")
    dpo_beta: float = opt(0.1, "with --dpo-data: DPO's beta, how far the policy may move from the reference")
    dpo_loss: str = opt("sigmoid", "with --dpo-data: sigmoid (DPO) or ipo (IPO, on per-token average "
                        "log-probabilities, as TRL computes it)", choices=DPO_LOSSES)
    dpo_reference_file: Optional[str] = opt(None, "with --dpo-data: the reference log-probabilities, read from this "
                                            "file when it exists (written by a first pass over the same data), else "
                                            "computed at the start and written to it")


def validate_posttrain(t: PostTrainConfig) -> None:
    if t.lora_rank < 0:
        raise ConfigError(f"--lora-rank must be >= 0 (0: no adapters), got {t.lora_rank}")
    if t.lora_rank:
        if not t.lora_alpha > 0:
            raise ConfigError(f"--lora-alpha must be positive, got {t.lora_alpha}")
        if not 0.0 <= t.lora_dropout < 1.0:
            raise ConfigError(f"--lora-dropout must be in [0, 1), got {t.lora_dropout}")
        unknown = [name for name in t.lora_target_modules if name not in LORA_TARGETS]
        if unknown or not t.lora_target_modules:
            raise ConfigError(f"--lora-target-modules {' '.join(unknown)}: unknown (known: "
                              f"{', '.join(LORA_TARGETS)})" if unknown else "--lora-target-modules names nothing")
    if not t.dpo_beta > 0:
        raise ConfigError(f"--dpo-beta must be positive, got {t.dpo_beta}")


def validate_posttrain_layout(cfg) -> None:
    """The rules post-training shares with other sections."""
    t, d, p = cfg.posttrain, cfg.data, cfg.parallel
    if t.dpo_reference_file and not d.dpo_data:
        raise ConfigError("--dpo-reference-file needs --dpo-data")
    if t.lora_rank and p.deepspeed:
        raise ConfigError("--lora-rank with --deepspeed: LoRA runs on megalm's own optimizer (drop --deepspeed; "
                          "--zero-stage 1/2 shards the adapters' state there)")
    if cfg.checkpoint.pretrained_checkpoint and p.deepspeed:
        raise ConfigError("--pretrained-checkpoint with --deepspeed: the engine restores only its own checkpoints; "
                          "fine-tune from megalm weights on megalm's own path (drop --deepspeed; --zero-stage 1/2 or "
                          "--use-torch-fsdp2 shard there)")
    if d.dpo_data and p.deepspeed:
        raise ConfigError("--dpo-data with --deepspeed: DPO runs on megalm's own path (drop --deepspeed)")
    if d.dpo_data and cfg.model.mtp_num_layers:
        raise ConfigError("--dpo-data with --mtp-num-layers: DPO's loss has no multi-token prediction term; drop "
                          "--mtp-num-layers for preference training")
