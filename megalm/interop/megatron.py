"""Megatron-LM interop: ``megalm-import-megatron`` turns a Megatron-LM / megatron-core checkpoint (``torch_dist``
or legacy, any TP/PP) into a megalm checkpoint that loads under any layout and continues at the same iteration
and data position; ``megalm-export-megatron`` writes a megalm checkpoint as a ``torch_dist`` checkpoint in
Megatron-LM's directory layout, with its ``args``, that megatron-core's ``dist_checkpointing.load`` reads.

Names: every spelling is brought to megatron-core's per-layer local-spec names first (the TE spec's norms folded
into ``linear_qkv.layer_norm_weight`` / ``linear_fc1.layer_norm_weight``, the older ``language_model.encoder``
names), then mapped one to one. Megatron's fused QKV is interleaved per query group (each group's query heads,
then its key, then its value); SwiGLU's ``linear_fc1`` is [gate; up], megalm's w1 and w3. The embedding and
output rows past the tokenizer's vocabulary are Megatron's padding: dropped on import, added on export.
File reading and writing live in ``megatron_format.py``.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import sys

import torch

from megalm.config import Config, ModelConfig, finalize
from megalm.interop.megatron_format import MegatronFormatError, local_spec_name, read_checkpoint_files

log = logging.getLogger("megalm")

# megatron-core local-spec name (after decoder.layers.N.) -> megalm name (after layers.N.)
LAYER_NAMES = {
    "input_layernorm.weight": "attention_norm.weight", "input_layernorm.bias": "attention_norm.bias",
    "self_attention.linear_proj.weight": "attention.wo.weight",
    "self_attention.linear_proj.bias": "attention.wo.bias",
    "self_attention.q_layernorm.weight": "attention.q_norm.weight",
    "self_attention.q_layernorm.bias": "attention.q_norm.bias",
    "self_attention.k_layernorm.weight": "attention.k_norm.weight",
    "self_attention.k_layernorm.bias": "attention.k_norm.bias",
    "pre_mlp_layernorm.weight": "mlp_norm.weight", "pre_mlp_layernorm.bias": "mlp_norm.bias",
    "mlp.linear_fc2.weight": "mlp.w2.weight", "mlp.linear_fc2.bias": "mlp.w2.bias",
}
OTHER_NAMES = {"embedding.word_embeddings.weight": "embedding.weight",
               "embedding.position_embeddings.weight": "position_embedding.weight",
               "decoder.final_layernorm.weight": "final_norm.weight", "decoder.final_layernorm.bias": "final_norm.bias",
               "output_layer.weight": "output.weight"}


def canonical_names(state: dict, source: str) -> dict:
    """Every tensor under megatron-core's per-layer local-spec name; a name megalm does not know stops."""
    out = {}
    for name, tensor in state.items():
        spec = local_spec_name(name)
        m = re.fullmatch(r"decoder\.layers\.(\d+)\.(.+)", spec)
        if m:
            rest = m.group(2)
            if rest not in LAYER_NAMES and not rest.startswith(("self_attention.linear_qkv.", "mlp.linear_fc1.")):
                raise MegatronFormatError(f"{source}: tensor {name} is not part of the GPT layers megalm imports")
            out[spec] = tensor
        elif spec in OTHER_NAMES:
            out[spec] = tensor
        else:
            raise MegatronFormatError(f"{source}: tensor {name} is not part of the GPT models megalm imports")
    return out


def _arg(args, name, default=None):
    return getattr(args, name, default)


# args that change what the model computes and that megalm does not implement: (name, the value megalm has)
REFUSED_ARGS = (("rotary_interleaved", False), ("squared_relu", False),
                ("apply_residual_connection_post_layernorm", False), ("num_experts", None),
                ("multi_latent_attention", False), ("apply_layernorm_1p", False), ("window_size", None),
                ("rotary_seq_len_interpolation_factor", None), ("qk_l2_norm", False),
                ("bias_gelu_fusion_approximate", False), ("mtp_num_layers", None))


def model_config_from_args(args, source: str) -> ModelConfig:
    """megalm's model options from Megatron-LM's ``args`` (the same flag names); anything that changes the
    computation and that megalm lacks stops with its name."""
    if args is None:
        raise MegatronFormatError(f"{source}: no args saved with the checkpoint (megalm needs the model's shape)")
    for name, ours in REFUSED_ARGS:
        value = _arg(args, name, ours)
        if value != ours and not (ours is False and value is None):
            raise MegatronFormatError(f"{source}: args.{name}={value!r} is not implemented by megalm "
                                      f"(it supports {ours!r})")
    if _arg(args, "rope_type") not in (None, "rope"):
        raise MegatronFormatError(f"{source}: args.rope_type={_arg(args, 'rope_type')!r} is not read by "
                                  f"megalm-import-megatron yet (it reads plain RoPE)")
    shape = [name for name in ("num_layers", "hidden_size", "num_attention_heads")
             if not isinstance(_arg(args, name), int) or _arg(args, name) < 1]
    if _arg(args, "group_query_attention") and not isinstance(_arg(args, "num_query_groups"), int):
        shape.append("num_query_groups (with group_query_attention)")
    if shape:
        raise MegatronFormatError(f"{source}: args lack the model's shape: {', '.join(shape)} (a positive integer "
                                  f"each)")
    m = ModelConfig()
    for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "seq_length",
                 "max_position_embeddings", "swiglu", "untie_embeddings_and_output_weights", "add_bias_linear",
                 "qk_layernorm", "make_vocab_size_divisible_by", "use_rope_scaling", "rope_scaling_factor",
                 "rotary_percent"):
        value = _arg(args, name)
        if value is not None:
            setattr(m, name, type(getattr(m, name))(value) if getattr(m, name) is not None else value)
    if _arg(args, "group_query_attention"):
        m.num_query_groups = args.num_query_groups
    if _arg(args, "kv_channels") not in (None, args.hidden_size // args.num_attention_heads):
        m.kv_channels = args.kv_channels
    position = _arg(args, "position_embedding_type") or (
        "rope" if _arg(args, "use_rotary_position_embeddings") else "learned_absolute")
    normalization = _arg(args, "normalization", "LayerNorm")
    if position not in ("rope", "learned_absolute") or normalization not in ("LayerNorm", "RMSNorm"):
        raise MegatronFormatError(f"{source}: position_embedding_type {position!r}, normalization "
                                  f"{normalization!r}: megalm implements rope or learned_absolute, LayerNorm or "
                                  f"RMSNorm")
    m.position_embedding_type, m.normalization = position, normalization
    m.norm_epsilon = float(_arg(args, "norm_epsilon", _arg(args, "layernorm_epsilon", 1e-5)))
    m.rotary_base = float(_arg(args, "rotary_base", 10000))
    m.gelu_approximation = "tanh" if _arg(args, "openai_gelu") else "none"
    m.add_qkv_bias = bool(_arg(args, "add_qkv_bias", False)) and not m.add_bias_linear
    return m


def _split_qkv(qkv: torch.Tensor, m: ModelConfig):
    """Megatron's per-group interleaved [q heads of group g; k_g; v_g] rows -> megalm's q, k, v rows."""
    groups, per, hd = m.num_query_groups, m.num_attention_heads // m.num_query_groups, m.head_dim
    parts = qkv.reshape(groups, per + 2, hd, *qkv.shape[1:])
    q = parts[:, :per].reshape(groups * per * hd, *qkv.shape[1:])
    return q, parts[:, per].reshape(groups * hd, *qkv.shape[1:]), parts[:, per + 1].reshape(groups * hd,
                                                                                            *qkv.shape[1:])


def _join_qkv(q, k, v, m: ModelConfig) -> torch.Tensor:
    groups, per, hd = m.num_query_groups, m.num_attention_heads // m.num_query_groups, m.head_dim
    rest = q.shape[1:]
    return torch.cat([q.reshape(groups, per, hd, *rest), k.reshape(groups, 1, hd, *rest),
                      v.reshape(groups, 1, hd, *rest)], 1).reshape(-1, *rest)


def to_megalm(state: dict, m: ModelConfig, vocab: int, source: str) -> dict:
    """megalm's whole-tensor state from canonical Megatron names, checked against the shapes ``m`` implies."""
    out = {}
    for name, tensor in state.items():
        layer = re.fullmatch(r"decoder\.layers\.(\d+)\.(.+)", name)
        if not layer:
            vocab_rows = name in ("embedding.word_embeddings.weight", "output_layer.weight")
            out[OTHER_NAMES[name]] = tensor[:vocab] if vocab_rows else tensor  # the rest is Megatron's padding
            continue
        i, rest = layer.groups()
        a = f"layers.{i}."
        if rest.startswith("self_attention.linear_qkv."):
            leaf = rest.rsplit(".", 1)[1]
            expected = (m.num_attention_heads + 2 * m.num_query_groups) * m.head_dim
            if tensor.shape[0] != expected:
                raise MegatronFormatError(f"{source}: {name} has {tensor.shape[0]} rows; args give "
                                          f"({m.num_attention_heads} heads + 2 x {m.num_query_groups} groups) x "
                                          f"{m.head_dim} = {expected}")
            for w, part in zip(("wq", "wk", "wv"), _split_qkv(tensor, m)):
                out[f"{a}attention.{w}.{leaf}"] = part
        elif rest.startswith("mlp.linear_fc1."):
            leaf = rest.rsplit(".", 1)[1]
            if m.swiglu:
                out[f"{a}mlp.w1.{leaf}"], out[f"{a}mlp.w3.{leaf}"] = tensor.chunk(2, dim=0)
            else:
                out[f"{a}mlp.w1.{leaf}"] = tensor
        else:
            out[a + LAYER_NAMES[rest]] = tensor
    return {k: v.float().contiguous() for k, v in out.items()}


def import_megatron(load: str, save: str, tokenizer_flags: list = ()) -> str:
    from megalm.config import load_config
    from megalm.data.tokenizers import build_tokenizer
    from megalm.model.gpt import GPT
    from megalm.parallel.state import Topology
    from megalm.training.checkpoint import CheckpointError, load_model_state, save_checkpoint

    folder, fmt, common, tensors = read_checkpoint_files(load)
    args = common.get("args")
    cfg = Config()
    cfg.model = model_config_from_args(args, folder)
    d = cfg.data
    for name in ("tokenizer_type", "vocab_file", "merge_file", "tokenizer_model", "vocab_size"):
        if _arg(args, name) is not None and hasattr(d, name):
            setattr(d, name, _arg(args, name))
    if tokenizer_flags:  # the tokenizer here, where the one args name lies elsewhere
        d = load_config(list(tokenizer_flags) + ["--tokenizer-type", d.tokenizer_type]
                        if "--tokenizer-type" not in tokenizer_flags else list(tokenizer_flags)).data
        cfg.data = d
    try:
        tok = build_tokenizer(d)
    except (OSError, ValueError) as exc:
        raise MegatronFormatError(f"{folder}: the tokenizer args name does not load here ({exc}); give its files "
                                  f"with --tokenizer-type/--vocab-file/--merge-file/--tokenizer-model") from None
    cfg = finalize(cfg)
    state = to_megalm(canonical_names(tensors, folder), cfg.model, tok.vocab_size, folder)
    rows = state["embedding.weight"].shape[0]
    if rows < tok.vocab_size:
        raise MegatronFormatError(f"{folder}: {rows} embedding rows for a tokenizer of {tok.vocab_size}")
    model = GPT(cfg.model, tok.vocab_size, Topology())
    try:
        load_model_state(model, state, Topology(), folder)
    except CheckpointError as exc:
        raise MegatronFormatError(str(exc)) from None
    iteration = int(common.get("iteration", _arg(args, "iteration", 0)) or 0)
    meta = {"consumed_samples": int(_arg(args, "consumed_train_samples", 0) or 0), "tokenizer": tok.fingerprint,
            "imported_from": os.path.abspath(folder), "megatron_format": fmt}
    path = save_checkpoint(save, iteration, model, {}, cfg, Topology(), meta, {})
    log.info("imported %s (Megatron %s, iteration %d, %d samples consumed) into %s", folder, fmt, iteration,
             meta["consumed_samples"], path)
    return path


def _run(prog: str, action, *args) -> int:
    """A command's body: logging on, and a bad checkpoint ends it with one line naming what is wrong."""
    from megalm.config import ConfigError
    from megalm.training.checkpoint import CheckpointError
    from megalm.training.logging import setup_logging

    setup_logging(0)
    try:
        action(*args)
    except (MegatronFormatError, CheckpointError, ConfigError, FileNotFoundError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    return 0


def import_main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="megalm-import-megatron", description="Megatron-LM checkpoint (torch_dist or "
                                "legacy, any TP/PP) -> megalm checkpoint at the same iteration and data position")
    p.add_argument("--load", required=True, help="Megatron-LM save directory, or one iter_* directory in it")
    p.add_argument("--save", required=True, help="megalm checkpoint directory to write")
    args, tokenizer_flags = p.parse_known_args(argv)
    return _run(p.prog, import_megatron, args.load, args.save, tokenizer_flags)


def to_megatron(state: dict, m: ModelConfig, padded_vocab: int, spec: str = "te") -> dict:
    """megatron-core's ``torch_dist`` tensors from megalm's whole-tensor state: layers stacked under
    ``decoder.layers.*`` with a leading layer axis, QKV interleaved per group, SwiGLU's fc1 [gate; up], the
    vocabulary padded with zero rows. ``spec`` "te": norms folded into ``linear_qkv`` / ``linear_fc1`` (what the
    TE spec and megatron-core's local spec since it mapped its names to TE's both read); "local": the unfolded
    ``input_layernorm`` / ``pre_mlp_layernorm`` names of older megatron-core local-spec checkpoints."""
    def padded(t):
        return torch.cat([t, t.new_zeros(padded_vocab - t.shape[0], *t.shape[1:])]) if padded_vocab > t.shape[0] \
            else t

    flat = {}
    for ours, theirs in OTHER_NAMES.items():
        if theirs in state:
            vocab_rows = ours in ("embedding.word_embeddings.weight", "output_layer.weight")
            flat[ours] = padded(state[theirs]) if vocab_rows else state[theirs]
    folded = {"input_layernorm.": "self_attention.linear_qkv.layer_norm_",
              "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"} if spec == "te" else {}
    for i in range(m.num_layers):
        a = f"layers.{i}."
        per_layer = {}
        for theirs, ours in LAYER_NAMES.items():
            if a + ours in state:
                per_layer[theirs] = state[a + ours]
        for leaf in ("weight", "bias"):
            if f"{a}attention.wq.{leaf}" in state:
                per_layer[f"self_attention.linear_qkv.{leaf}"] = _join_qkv(
                    *(state[f"{a}attention.{w}.{leaf}"] for w in ("wq", "wk", "wv")), m)
            if f"{a}mlp.w1.{leaf}" in state:
                w1 = state[f"{a}mlp.w1.{leaf}"]
                per_layer[f"mlp.linear_fc1.{leaf}"] = torch.cat([w1, state[f"{a}mlp.w3.{leaf}"]]) if m.swiglu else w1
        for name, tensor in per_layer.items():
            for old, new in folded.items():
                if name.startswith(old):
                    name = new + name[len(old):]
            flat.setdefault(f"decoder.layers.{name}", []).append(tensor)
    return {k: (torch.stack(v) if isinstance(v, list) else v).contiguous() for k, v in flat.items()}


def megatron_args(cfg: Config, vocab: int, padded_vocab: int, tp: int, iteration: int, consumed: int):
    """Megatron-LM's ``args`` for this model: megalm's options under their (shared) Megatron names, plus what
    Megatron derives (padded vocabulary, GQA switch, head width, progress)."""
    args = argparse.Namespace()
    for section in ("model", "data", "train", "optim"):
        for name, value in vars(getattr(cfg, section)).items():
            if isinstance(value, (int, float, str, bool, type(None), list)):
                setattr(args, name, value)
    m = cfg.model
    args.num_query_groups = m.num_query_groups
    args.group_query_attention = m.num_query_groups != m.num_attention_heads
    args.kv_channels, args.padded_vocab_size = m.head_dim, padded_vocab
    args.tensor_model_parallel_size, args.pipeline_model_parallel_size = tp, 1
    args.openai_gelu = m.gelu_approximation == "tanh"
    args.iteration, args.consumed_train_samples, args.ckpt_format = iteration, consumed, "torch_dist"
    args.params_dtype = torch.float32
    return args


def export_megatron(load: str, save: str, tp: int = 1, spec: str = "te") -> str:
    """Write ``SAVE/iter_NNNNNNN/`` (torch_dist: ``.metadata``, ``__0_0.distcp``, ``common.pt``, ``metadata.json``)
    and ``SAVE/latest_checkpointed_iteration.txt``, as Megatron-LM's save leaves them."""
    import io
    import json
    import torch.distributed.checkpoint as dcp

    from megalm.training.checkpoint import read_checkpoint

    state = read_checkpoint(load, parts=("model",))
    cfg, meta = state["config"], state["meta"]
    m = cfg.model
    lacking = [what for what, has in (("experts (--num-experts)", m.num_experts),
                                      ("multi-latent attention", m.multi_latent_attention),
                                      ("multi-token prediction (--mtp-num-layers)", m.mtp_num_layers),
                                      (f"--softmax-type {m.softmax_type}", m.softmax_type != "vanilla"),
                                      ("--sliding-window", m.sliding_window)) if has]
    if lacking:  # their tensors have no name here yet: refused before anything is written
        raise MegatronFormatError(f"{state['path']}: megalm-export-megatron writes dense GPT layers; this model has "
                                  f"{', '.join(lacking)}, which it does not export (use megalm-export-hf)")
    vocab = state["model"]["embedding.weight"].shape[0]
    multiple = m.make_vocab_size_divisible_by * tp
    padded_vocab = (vocab + multiple - 1) // multiple * multiple
    tensors = to_megatron(state["model"], m, padded_vocab, spec)
    for name in [n for n in tensors if n.startswith("decoder.layers.") and not n.endswith("layer_norm_weight")]:
        if name.endswith(".weight") and not name.endswith(("layernorm.weight", "layer_norm_weight")):
            module = name[:-len(".weight")]  # the layer's modules keep (empty) extra state, one object per layer
            for i in range(m.num_layers):
                buf = io.BytesIO()
                torch.save(None, buf)
                tensors[f"{module}._extra_state/shard_{i}_{m.num_layers}"] = [buf]  # as megatron-core keeps it
    iteration = meta["iteration"]
    folder = os.path.join(save, f"iter_{iteration:07d}")
    if os.path.exists(folder):
        raise MegatronFormatError(f"{folder} exists; give another --save")
    os.makedirs(folder)
    dcp.save(tensors, storage_writer=dcp.FileSystemWriter(folder), no_dist=True,
             planner=dcp.DefaultSavePlanner(flatten_state_dict=False))
    torch.save({"args": megatron_args(cfg, vocab, padded_vocab, tp, iteration, meta.get("consumed_samples", 0)),
                "checkpoint_version": 3.0, "iteration": iteration}, os.path.join(folder, "common.pt"))
    with open(os.path.join(folder, "metadata.json"), "w") as fh:
        json.dump({"sharded_backend": "torch_dist", "sharded_backend_version": 1, "common_backend": "torch",
                   "common_backend_version": 1}, fh)
    with open(os.path.join(save, "latest_checkpointed_iteration.txt"), "w") as fh:
        fh.write(str(iteration))
    log.info("exported %s to %s (torch_dist, %s-spec names, vocabulary padded to %d for TP %d)", state["path"],
             folder, spec, padded_vocab, tp)
    return folder


def export_main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="megalm-export-megatron", description="megalm checkpoint (any layout) -> "
                                "Megatron-LM torch_dist checkpoint that megatron-core's dist_checkpointing loads")
    p.add_argument("--load", required=True, help="megalm checkpoint (a --save root or an iter_* directory)")
    p.add_argument("--save", required=True, help="Megatron-LM save directory to write")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1,
                   help="the TP size Megatron will load it at: its padded vocabulary depends on it")
    p.add_argument("--megatron-spec", choices=("te", "local"), default="te",
                   help="layer-norm names: folded into linear_qkv/linear_fc1 (te; also what megatron-core's local "
                        "spec reads today) or older local-spec input_layernorm/pre_mlp_layernorm (local)")
    args = p.parse_args(argv)
    return _run(p.prog, export_megatron, args.load, args.save, args.tensor_model_parallel_size, args.megatron_spec)


if __name__ == "__main__":
    sys.exit(import_main())
