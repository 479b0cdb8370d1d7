"""The Hugging Face model families megalm converts, one class each: which megalm models it is
(``claims``/``check``), its ``config.json`` both ways, and its tensor names. A new family is a new class, in
``dense.py``, ``moe.py`` or a module of its own, added to ``FAMILIES``; what it shares with a relative it inherits
(Mistral, Qwen and the MoE families are Llama-like). The renames and ``Family`` itself are in ``base.py``.
"""
from __future__ import annotations

from typing import List

from megalm.config import ModelConfig
from megalm.interop.families.base import ConversionError, Family
from megalm.interop.families.dense import GPT2, Llama, Mistral, Qwen2, Qwen3
from megalm.interop.families.deepseek import DeepseekV3
from megalm.interop.families.moe import Glm4MoE, GptOss, Mixtral, Qwen3MoE

__all__ = ["ConversionError", "Family", "FAMILIES", "family_of", "family_of_config"]

# a megalm model is claimed by one family at most
FAMILIES: List[Family] = [GPT2(), Llama(), Mistral(), Qwen2(), Qwen3(), Mixtral(), Qwen3MoE(), Glm4MoE(), GptOss(),
                          DeepseekV3()]
BY_MODEL_TYPE = {f.model_type: f for f in FAMILIES}


def family_of(m: ModelConfig) -> Family:
    """The family of a megalm model, or a ConversionError naming what it lacks."""
    claimed = [family for family in FAMILIES if family.claims(m)]
    assert len(claimed) <= 1, f"families claim the same model: {claimed}"
    for family in claimed:
        family.check(m)
        if m.mtp_num_layers and not family.mtp:
            raise ConversionError(f"{family.architecture} has no multi-token prediction layers: export a model "
                                  f"without --mtp-num-layers")
        return family
    raise ConversionError(f"no transformers architecture for position {m.position_embedding_type}, "
                          f"{m.normalization}, swiglu={m.swiglu}: export supports the GPT-2 flavour "
                          f"(learned, LayerNorm, GELU) and the Llama flavour (rope, RMSNorm, SwiGLU)")


def family_of_config(hf: dict) -> Family:
    kind = hf.get("model_type")
    if kind not in BY_MODEL_TYPE:
        raise ConversionError(f"config.json: model_type {kind!r} is not supported "
                              f"({', '.join(BY_MODEL_TYPE)})")
    return BY_MODEL_TYPE[kind]
