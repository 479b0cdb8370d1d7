"""What every Hugging Face family is made of: the renames that move tensors between megalm's names and the
family's (one to one, stacked, per expert), the config.json keys that change nothing, and ``Family``, the class each
family subclasses.

Checkpoints hold whole, unpadded tensors under global names, so a name map is a list of renames: most tensors
map one to one, GPT-2's Conv1D weights are transposed and its ``c_attn`` is our ``wq|wk|wv`` stacked, and experts
are our ``[E, in, out]`` stack against one ``[out, in]`` matrix per expert.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch

from megalm.config import ModelConfig


class ConversionError(ValueError):
    pass


# --- renames: each moves tensors one way (export: megalm -> HF) and back (load: HF -> megalm) --------------------

@dataclass
class Rename:
    ours: str
    theirs: str
    transpose: bool = False

    def export(self, state: dict, out: dict) -> None:
        out[self.theirs] = state[self.ours].t() if self.transpose else state[self.ours]

    def load(self, hf: dict, out: dict) -> None:
        out[self.ours] = hf[self.theirs].t() if self.transpose else hf[self.theirs]


@dataclass
class Stacked:
    """Several of our tensors stacked along dim 0 into one of theirs (transposed after stacking when asked)."""
    ours: Tuple[str, ...]
    theirs: str
    sizes: Tuple[int, ...]
    transpose: bool = False

    def export(self, state: dict, out: dict) -> None:
        joined = torch.cat([state[name] for name in self.ours])
        out[self.theirs] = joined.t() if self.transpose else joined

    def load(self, hf: dict, out: dict) -> None:
        joined = hf[self.theirs].t() if self.transpose else hf[self.theirs]
        for name, part in zip(self.ours, joined.split(list(self.sizes))):
            out[name] = part


@dataclass
class Experts:
    """Our ``[E, in, out]`` expert stack against their ``[out, in]`` matrix per expert (``theirs`` has ``{}``)."""
    ours: str
    theirs: str
    count: int

    def export(self, state: dict, out: dict) -> None:
        for e, matrix in enumerate(state[self.ours]):
            out[self.theirs.format(e)] = matrix.t()

    def load(self, hf: dict, out: dict) -> None:
        out[self.ours] = torch.stack([hf[self.theirs.format(e)].t() for e in range(self.count)])


@dataclass
class RopeRows:
    """Projection rows laid out per head as [``passed`` rows RoPE leaves alone; ``rotated`` rows], whose rotated
    rows DeepSeek's files keep in interleaved pairs (transformers' ``rope_interleave``) and megalm in halves: the
    same rotation once the rows are reordered, on the way in and back on the way out."""
    ours: str
    theirs: str
    heads: int
    passed: int
    rotated: int

    def _reorder(self, w: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        per_head = w.view(self.heads, self.passed + self.rotated, -1)
        return torch.cat((per_head[:, : self.passed], per_head[:, self.passed:][:, order]), dim=1).reshape(w.shape)

    def _halves(self) -> torch.Tensor:
        """Our row j is their row ``_halves()[j]``: first the pairs' first members, then their second."""
        return torch.cat((torch.arange(0, self.rotated, 2), torch.arange(1, self.rotated, 2)))

    def export(self, state: dict, out: dict) -> None:
        out[self.theirs] = self._reorder(state[self.ours], torch.argsort(self._halves()))

    def load(self, hf: dict, out: dict) -> None:
        out[self.ours] = self._reorder(hf[self.theirs], self._halves())


@dataclass
class Copy:
    """A tensor the family's files hold twice (DeepSeek's multi-token prediction layers repeat the embedding and
    the output layer, which megalm's modules share): written again on export; on load it must equal the first."""
    ours: str
    theirs: str
    first: str  # their name of the tensor it repeats

    def export(self, state: dict, out: dict) -> None:
        out[self.theirs] = state[self.ours].clone()  # a tensor of its own in the files, as DeepSeek's are

    def load(self, hf: dict, out: dict) -> None:
        if not torch.equal(hf[self.theirs], hf[self.first]):
            raise ConversionError(f"{self.theirs} differs from {self.first}: megalm's multi-token prediction shares "
                                  f"one embedding and output layer with the main model")


@dataclass
class Interleaved:
    """Two of our tensors interleaved along their last dim into one of theirs (GPT-OSS's ``gate_up_proj``: the
    gate at even columns, the linear half at odd ones)."""
    ours: Tuple[str, str]
    theirs: str

    def export(self, state: dict, out: dict) -> None:
        a, b = (state[name] for name in self.ours)
        out[self.theirs] = torch.stack((a, b), dim=-1).flatten(-2)

    def load(self, hf: dict, out: dict) -> None:
        both = hf[self.theirs]
        out[self.ours[0]], out[self.ours[1]] = both[..., ::2], both[..., 1::2]


# --- config.json helpers ------------------------------------------------------------------------------------------

# config.json keys that do not change what the model computes from its weights: metadata, generation and
# training-only settings (dropout). Anything else must be implemented by the family or the import stops with its name.
NEUTRAL_KEYS = {
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "_name_or_path", "bos_token_id",
    "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id", "use_cache", "initializer_range",
    "output_attentions", "output_hidden_states", "return_dict", "id2label", "label2id", "problem_type",
    "tokenizer_class", "task_specific_params", "finetuning_task", "prefix", "vocab_size", "attn_pdrop",
    "embd_pdrop", "resid_pdrop", "attention_dropout", "summary_type", "summary_use_proj", "summary_activation",
    "summary_proj_to_labels", "summary_first_dropout", "reorder_and_upcast_attn", "n_ctx", "pretraining_tp",
    "max_position_embeddings", "tie_word_embeddings", "chunk_size_feed_forward", "is_encoder_decoder",
    "is_decoder", "pruned_heads", "tie_encoder_decoder", "use_return_dict",
}


def require(hf: dict, key: str, allowed, default) -> None:
    value = hf.get(key, default)
    if value not in allowed:
        raise ConversionError(f"config.json: {key}={value!r} is not implemented by megalm (it supports "
                              f"{', '.join(map(repr, allowed))})")


class Family:
    """One transformers architecture. ``keys`` are the config.json keys it implements, gathered over the class
    and its bases (each class lists only what it adds)."""
    model_type = ""
    architecture = ""
    adds_keys: frozenset = frozenset()
    mtp = False  # whether its files can hold multi-token prediction layers

    def keys(self) -> set:
        return set().union(*(vars(c).get("adds_keys", ()) for c in type(self).__mro__))

    def claims(self, m: ModelConfig) -> bool:
        """Whether ``m`` is this family's model (then ``check`` says what it lacks)."""
        raise NotImplementedError

    def check(self, m: ModelConfig) -> None:
        pass

    def hf_config(self, m: ModelConfig, vocab: int, eod: int, dtype: str) -> dict:
        raise NotImplementedError

    def model_config(self, hf: dict) -> ModelConfig:
        unknown = sorted(k for k in hf if k not in NEUTRAL_KEYS | self.keys())
        if unknown:
            raise ConversionError(f"config.json: {', '.join(f'{k}={hf[k]!r}' for k in unknown)}: not implemented "
                                  f"by megalm; importing anyway could give other logits than transformers, so it "
                                  f"stops")
        return ModelConfig()

    def renames(self, m: ModelConfig) -> list:
        raise NotImplementedError

    def fit_to_weights(self, m: ModelConfig, weights: dict) -> None:
        """Adjust an imported model to what the files hold (layers their config names but transformers dropped)."""
