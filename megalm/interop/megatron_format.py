"""Reading and writing Megatron-LM / megatron-core checkpoint files, without Megatron.

Two formats, as Megatron-LM's ``save_checkpoint`` leaves them under ``SAVE/iter_NNNNNNN/`` (and
``SAVE/latest_checkpointed_iteration.txt``):

- ``torch_dist`` (``metadata.json`` says so): PyTorch distributed checkpointing. ``.metadata`` is a pickle of DCP's
  ``Metadata``: every tensor's global shape, its chunks (offsets and sizes) and where each chunk's bytes lie
  (``__R_F.distcp`` file, offset, length); each chunk is a ``torch.save`` of that chunk. ``common.pt`` holds the
  rest: ``args`` (an argparse Namespace with a few Megatron enums), ``iteration``, ``checkpoint_version``.
  megatron-core stores homogeneous layers stacked, one tensor per name with a leading layer axis
  (``decoder.layers.self_attention.linear_qkv.weight``), in global coordinates whatever the TP size.
- legacy ``torch``: ``mp_rank_XX[_YYY]/model_optim_rng.pt`` per TP (and PP) rank, a ``torch.save`` of ``args``,
  ``iteration`` and the model's ``state_dict()`` with this rank's shards under per-layer names.

Nothing is unpickled freely. ``common.pt``, ``model_optim_rng.pt`` and every tensor chunk go through torch's
weights-only unpickler, with ``argparse.Namespace`` and stand-ins for Megatron's enums (``MegatronEnum``, keeping
the value) as the only additions. DCP writes ``.metadata`` with pickle protocol 4, which torch's unpickler does not
read (it stops at the frame opcode), so it goes through a ``pickle.Unpickler`` whose ``find_class`` admits only
DCP's own metadata classes, ``torch.Size`` and dtypes: anything else stops the read with its name.
"""
from __future__ import annotations

import argparse
import importlib
import io
import json
import math
import os
import pickle
import re

import torch


class MegatronFormatError(ValueError):
    pass


class MegatronEnum:
    """Stands in for a Megatron enum member found in ``args`` (only its value is kept; megalm never imports
    Megatron)."""

    def __init__(self, value=None):
        self.value = value

    def __repr__(self) -> str:
        return f"MegatronEnum({self.value!r})"


MEGATRON_ENUMS = ("megatron.core.transformer.enums.AttnBackend", "megatron.core.transformer.enums.AttnMaskType",
                  "megatron.core.transformer.enums.AttnType", "megatron.core.transformer.enums.LayerType",
                  "megatron.core.transformer.enums.ModelType", "megatron.core.enums.ModelType",
                  "megatron.core.transformer.enums.CudaGraphScope", "megatron.core.enums.Fp8Recipe",
                  "megatron.core.transformer.enums.Fp8Recipe", "megatron.core.fp8_utils.Fp8Recipe",
                  "megatron.model.enums.AttnMaskType", "megatron.model.enums.LayerType",
                  "megatron.model.enums.AttnType", "megatron.model.enums.ModelType")


def _safe_globals() -> list:
    stand_ins = [(type(name.rsplit(".", 1)[1], (MegatronEnum,), {}), name) for name in MEGATRON_ENUMS]
    return [argparse.Namespace, *stand_ins]


def torch_load(path: str, data: bytes = None):
    """``torch.load`` with the weights-only unpickler, admitting ``args`` and Megatron's enums; a file that needs
    anything more, or that is truncated, stops with its name."""
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(io.BytesIO(data) if data is not None else path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise MegatronFormatError(f"{path}: holds something megalm does not unpickle ({str(exc).splitlines()[0]})")
    except (RuntimeError, EOFError, OSError) as exc:
        raise MegatronFormatError(f"{path}: unreadable ({str(exc).splitlines()[0]}); truncated?") from None


DCP_MODULES = {"torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem",
               "torch.distributed.checkpoint.planner"}


class _MetadataUnpickler(pickle.Unpickler):
    """Exact names only: pickle protocol 4 resolves a dotted name attribute by attribute, so
    ``torch.distributed.checkpoint.metadata`` + ``os.system`` would reach ``os.system`` through the module's own
    ``import os``; a name is admitted only as a class defined in the DCP module named."""

    def find_class(self, module, name):
        if module in DCP_MODULES and "." not in name and not name.startswith("__"):
            found = getattr(importlib.import_module(module), name, None)
            if isinstance(found, type) and found.__module__ == module:
                return found
        if module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)):
            return getattr(torch, name)
        if (module, name) == ("torch.serialization", "_get_layout"):
            return super().find_class(module, name)
        if (module, name) in (("collections", "OrderedDict"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath")):
            return super().find_class(module, name)  # torch's own saves record the checkpoint's path
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's metadata")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids are not part of a checkpoint's metadata")


def read_dcp_metadata(folder: str):
    path = os.path.join(folder, ".metadata")
    try:
        with open(path, "rb") as fh:
            return _MetadataUnpickler(fh).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError) as exc:
        raise MegatronFormatError(f"{path}: not a distributed-checkpoint metadata file megalm reads ({exc})") \
            from None


def iteration_folder(load: str) -> str:
    """``load`` itself when it holds a checkpoint, else the iteration ``latest_checkpointed_iteration.txt`` names."""
    pointer = os.path.join(load, "latest_checkpointed_iteration.txt")
    if os.path.exists(pointer):
        text = open(pointer).read().strip()
        if text != "release" and not text.isdigit():
            raise MegatronFormatError(f"{pointer}: expected an iteration number or 'release', found {text[:40]!r}")
        name = "release" if text == "release" else f"iter_{int(text):07d}"
        load = os.path.join(load, name)
    if not os.path.isdir(load):
        raise MegatronFormatError(f"{load}: no such checkpoint directory")
    return load


def _read_chunk(folder: str, name: str, info, shape) -> torch.Tensor:
    path = os.path.join(folder, info.relative_path)
    if getattr(info, "transform_descriptors", None):
        raise MegatronFormatError(f"{path}: {name} is stored transformed ({info.transform_descriptors}), which "
                                  f"megalm does not read")
    try:
        with open(path, "rb") as fh:
            fh.seek(info.offset)
            data = fh.read(info.length)
    except OSError as exc:
        raise MegatronFormatError(f"{path}: {name}: {exc}") from None
    if len(data) != info.length:
        raise MegatronFormatError(f"{path}: {name} needs bytes {info.offset}..{info.offset + info.length}, the "
                                  f"file ends at {info.offset + len(data)} (truncated)")
    tensor = torch_load(f"{path} ({name})", data)
    if not torch.is_tensor(tensor) or tuple(tensor.shape) != tuple(shape):
        raise MegatronFormatError(f"{path}: {name} holds {getattr(tensor, 'shape', type(tensor).__name__)} where "
                                  f".metadata says {tuple(shape)}")
    return tensor


def read_torch_dist(folder: str) -> tuple:
    """(common, {name: global tensor}) of a ``torch_dist`` checkpoint: model tensors only (optimizer state and
    ``_extra_state`` left aside), stacked layers split back into ``decoder.layers.N.*``."""
    common = torch_load(os.path.join(folder, "common.pt"))
    meta = read_dcp_metadata(folder)
    chunks = {}
    for index, info in meta.storage_data.items():
        chunks[(index.fqn, tuple(index.offset or ()))] = info
    out = {}
    for name, md in meta.state_dict_metadata.items():
        if not hasattr(md, "chunks") or "_extra_state" in name or name.startswith(("optimizer", "rng_state")):
            continue
        tensor = torch.empty(tuple(md.size), dtype=md.properties.dtype)
        covered = sum(math.prod(chunk.sizes) for chunk in md.chunks)
        if covered != tensor.numel():
            raise MegatronFormatError(f"{folder}/.metadata: the chunks of {name} cover {covered} of its "
                                      f"{tensor.numel()} values (shape {tuple(md.size)}): the checkpoint is "
                                      f"incomplete")
        for chunk in md.chunks:
            info = chunks.get((name, tuple(chunk.offsets)))
            if info is None:
                raise MegatronFormatError(f"{folder}/.metadata: no storage recorded for {name} at "
                                          f"{tuple(chunk.offsets)}")
            where = tuple(slice(o, o + s) for o, s in zip(chunk.offsets, chunk.sizes))
            tensor[where] = _read_chunk(folder, name, info, chunk.sizes)
        out[name] = tensor
    return common, unstack_layers(out)


def unstack_layers(state: dict) -> dict:
    """``decoder.layers.X`` with a leading layer axis -> ``decoder.layers.N.X`` per layer."""
    out = {}
    for name, tensor in state.items():
        if name.startswith("decoder.layers.") and not re.match(r"decoder\.layers\.\d+\.", name):
            rest = name[len("decoder.layers."):]
            for i, layer in enumerate(tensor.unbind(0)):
                out[f"decoder.layers.{i}.{rest}"] = layer.clone()
        else:
            out[name] = tensor
    return out


# how each tensor is split over TP ranks in the legacy per-rank files: concatenated along dim 0 or 1, or the same
# on every rank (norms, row-parallel biases, position embeddings)
# other spellings -> megatron-core's per-layer local-spec names (applied to the part after the layer prefix)
LAYER_RENAMES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",  # TE spec
    "self_attention.linear_qkv.layer_norm_bias": "input_layernorm.bias",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
    "mlp.linear_fc1.layer_norm_bias": "pre_mlp_layernorm.bias",
    "self_attention.query_key_value.weight": "self_attention.linear_qkv.weight",  # language_model.encoder
    "self_attention.query_key_value.bias": "self_attention.linear_qkv.bias",
    "self_attention.dense.weight": "self_attention.linear_proj.weight",
    "self_attention.dense.bias": "self_attention.linear_proj.bias",
    "post_attention_layernorm.weight": "pre_mlp_layernorm.weight",
    "post_attention_layernorm.bias": "pre_mlp_layernorm.bias",
    "mlp.dense_h_to_4h.weight": "mlp.linear_fc1.weight", "mlp.dense_h_to_4h.bias": "mlp.linear_fc1.bias",
    "mlp.dense_4h_to_h.weight": "mlp.linear_fc2.weight", "mlp.dense_4h_to_h.bias": "mlp.linear_fc2.bias",
}
OTHER_RENAMES = {
    "language_model.embedding.word_embeddings.weight": "embedding.word_embeddings.weight",
    "language_model.embedding.position_embeddings.weight": "embedding.position_embeddings.weight",
    "language_model.encoder.final_layernorm.weight": "decoder.final_layernorm.weight",
    "language_model.encoder.final_layernorm.bias": "decoder.final_layernorm.bias",
    "language_model.output_layer.weight": "output_layer.weight",
}


def local_spec_name(name: str) -> str:
    """megatron-core's per-layer local-spec spelling of a tensor name (TE-spec norms, ``language_model.encoder``)."""
    name = OTHER_RENAMES.get(name, name)
    m = re.fullmatch(r"(?:decoder|language_model\.encoder)\.layers\.(\d+)\.(.+)", name)
    return f"decoder.layers.{m.group(1)}.{LAYER_RENAMES.get(m.group(2), m.group(2))}" if m else name


# how TP shards of a local-spec name join: along dim 0 (column parallel), dim 1 (row parallel), else replicated
TP_DIM0 = ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias", "mlp.linear_fc1.weight",
           "mlp.linear_fc1.bias", "word_embeddings.weight", "output_layer.weight")
TP_DIM1 = ("self_attention.linear_proj.weight", "mlp.linear_fc2.weight")


def _flatten(state: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in state.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        elif torch.is_tensor(value):
            out[prefix + key] = value
    return out


def read_legacy(folder: str) -> tuple:
    """(common, {name: global tensor}) from ``mp_rank_XX[_YYY]/model_optim_rng.pt``: TP shards joined (SwiGLU's
    fused ``linear_fc1`` per rank is [gate; up]: gates joined, then ups), pipeline stages' layers renumbered."""
    ranks = {}
    for entry in sorted(os.listdir(folder)):
        m = re.fullmatch(r"mp_rank_(\d{2})(?:_(\d{3}))?", entry)
        if m:
            ranks[(int(m.group(1)), int(m.group(2) or 0))] = os.path.join(folder, entry, "model_optim_rng.pt")
    if not ranks:
        raise MegatronFormatError(f"{folder}: neither a torch_dist checkpoint (metadata.json) nor legacy "
                                  f"mp_rank_XX directories")
    tp, pp = max(t for t, _ in ranks) + 1, max(p for _, p in ranks) + 1
    if set(ranks) != {(t, p) for t in range(tp) for p in range(pp)}:
        raise MegatronFormatError(f"{folder}: rank directories {sorted(ranks)} do not form a TP x PP grid")
    common, stages = None, []
    for p in range(pp):
        shards = []
        for t in range(tp):
            path = ranks[(t, p)]
            if not os.path.exists(path):
                raise MegatronFormatError(f"{path}: missing")
            obj = torch_load(path)
            common = common or {k: v for k, v in obj.items() if k != "model" and not k.startswith("model")}
            model = obj.get("model")
            if model is None:
                raise MegatronFormatError(f"{path}: no 'model' state (virtual pipeline chunks model0, model1, "
                                          f"... are not read)")
            shards.append({k: v for k, v in _flatten(model).items() if "_extra_state" not in k})
        swiglu = bool(getattr(common.get("args"), "swiglu", False))
        stages.append(_join_tp(shards, swiglu, ranks[(0, p)]))
    return common, _join_stages(stages, common)


def _join_tp(shards: list, swiglu: bool, where: str) -> dict:
    """One stage's tensors from its TP shards, the split decided by each name's local-spec spelling (so that
    ``language_model.encoder`` names join like ``decoder`` ones)."""
    out = {}
    for name in shards[0]:
        parts = [s.get(name) for s in shards]
        if any(p is None for p in parts):
            raise MegatronFormatError(f"{where}: {name} is missing on some TP ranks")
        spec = local_spec_name(name)
        if len(parts) == 1:
            out[name] = parts[0]
        elif swiglu and spec.endswith(("mlp.linear_fc1.weight", "mlp.linear_fc1.bias")):
            halves = [p.chunk(2, dim=0) for p in parts]
            out[name] = torch.cat([h[0] for h in halves] + [h[1] for h in halves])
        elif spec.endswith(TP_DIM0):
            out[name] = torch.cat(parts, 0)
        elif spec.endswith(TP_DIM1):
            out[name] = torch.cat(parts, 1)
        else:
            out[name] = parts[0]
    return out


def _join_stages(stages: list, common: dict) -> dict:
    if len(stages) == 1:
        return stages[0]
    args = common.get("args")
    layers = getattr(args, "num_layers", None)
    if layers is None or layers % len(stages) or getattr(args, "decoder_first_pipeline_num_layers", None):
        raise MegatronFormatError("legacy checkpoint with pipeline stages: only an even split of --num-layers is "
                                  "read")
    per = layers // len(stages)
    out = {}
    for p, stage in enumerate(stages):
        for name, tensor in stage.items():
            m = re.match(r"((?:decoder|language_model\.encoder)\.layers\.)(\d+)(\..*)", name)
            out[f"{m.group(1)}{int(m.group(2)) + p * per}{m.group(3)}" if m else name] = tensor
    return out


def read_checkpoint_files(load: str) -> tuple:
    """(folder, format, common, tensors) of a Megatron-LM checkpoint (the save root or an iteration folder)."""
    folder = iteration_folder(load)
    meta_json = os.path.join(folder, "metadata.json")
    if os.path.exists(meta_json):
        with open(meta_json) as fh:
            backend = json.load(fh).get("sharded_backend")
        if backend != "torch_dist":
            raise MegatronFormatError(f"{meta_json}: sharded_backend {backend!r}; megalm reads torch_dist")
        common, tensors = read_torch_dist(folder)
        return folder, "torch_dist", common, tensors
    common, tensors = read_legacy(folder)
    return folder, "torch", common, tensors
