"""Defects a CPU run does not show by itself, each pinned by a test that failed before its fix: crafted pickles,
checkpoints whose pieces do not cover a tensor, host-side flags on the collective device."""
import os
import struct

import pytest

from megalm.interop.megatron_format import MegatronFormatError, read_dcp_metadata


def _global_call_pickle(module: str, name: str, arg: str) -> bytes:
    """A protocol-4 pickle that looks ``name`` up in ``module`` with STACK_GLOBAL and calls it with ``arg``."""
    def text(s):
        b = s.encode()
        return b"\x8c" + struct.pack("<B", len(b)) + b  # SHORT_BINUNICODE
    return b"\x80\x04" + text(module) + text(name) + b"\x93" + text(arg) + b"\x85" + b"R" + b"."


@pytest.mark.parametrize("module", ["torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem"])
def test_dotted_name_in_dcp_metadata_runs_nothing(tmp_path, module):
    marker = tmp_path / "pwned"
    (tmp_path / ".metadata").write_bytes(_global_call_pickle(module, "os.system", f"touch {marker}"))
    with pytest.raises(MegatronFormatError, match=r"\.metadata: not a distributed-checkpoint metadata file"):
        read_dcp_metadata(str(tmp_path))
    assert not os.path.exists(marker)


def test_real_dcp_metadata_still_reads(tmp_path):
    import torch
    import torch.distributed.checkpoint as dcp

    dcp.save({"w": torch.arange(6.0).reshape(2, 3)}, storage_writer=dcp.FileSystemWriter(str(tmp_path)), no_dist=True)
    meta = read_dcp_metadata(str(tmp_path))
    assert tuple(meta.state_dict_metadata["w"].size) == (2, 3)


def test_checkpoint_pieces_must_cover_the_tensor():
    """Two TP shards of a [4, 3] tensor saved, one index entry lost: refused with the counts, whole and as a rank's
    part, instead of rows of uninitialised memory (whole) or zeros (part)."""
    import torch

    from megalm.parallel.state import Topology
    from megalm.training.checkpoint import CheckpointError, _join

    full = torch.arange(12.0).reshape(4, 3)
    pieces, entries = [full[:2], full[2:]], [["a.pt", 0, 0, 2, False], ["b.pt", 0, 2, 4, False]]
    param = torch.nn.Parameter(torch.empty(4, 3))
    assert torch.equal(_join(pieces, entries, None), full)
    assert torch.equal(_join(pieces, entries, None, (param, Topology())), full)
    for kept in ([0], [1]):
        with pytest.raises(CheckpointError, match=r"cover 6 of its 12 values"):
            _join([pieces[i] for i in kept], [entries[i] for i in kept], None, (param, Topology()))
    with pytest.raises(CheckpointError, match=r"cover 6 of its 12 values"):
        _join(pieces[1:], entries[1:], None)  # whole: rows 0..2 would be whatever memory held
    # padding rows (past a vocabulary of 3) are never saved and need no cover
    padded = [["a.pt", 0, 0, 2, True], ["b.pt", 0, 2, 4, True]]
    assert torch.equal(_join([full[:2], full[2:3]], [padded[0], ["b.pt", 0, 2, 3, True]], 3,
                             (param, Topology()))[:3], full[:3])


def test_torch_dist_chunks_must_cover_the_tensor(tmp_path, monkeypatch):
    import torch
    import torch.distributed.checkpoint as dcp

    from megalm.interop import megatron_format

    dcp.save({"decoder.final_layernorm.weight": torch.ones(4)},
             storage_writer=dcp.FileSystemWriter(str(tmp_path)), no_dist=True)
    torch.save({}, tmp_path / "common.pt")
    meta = read_dcp_metadata(str(tmp_path))
    assert megatron_format.read_torch_dist(str(tmp_path))[1]["decoder.final_layernorm.weight"].sum() == 4
    meta.state_dict_metadata["decoder.final_layernorm.weight"].size = torch.Size([8])  # a chunk of 8 lost
    monkeypatch.setattr(megatron_format, "read_dcp_metadata", lambda folder: meta)
    with pytest.raises(MegatronFormatError, match=r"chunks of decoder.final_layernorm.weight cover 4 of its 8"):
        megatron_format.read_torch_dist(str(tmp_path))


def test_save_flags_go_through_the_collective_device(monkeypatch):
    """Under NCCL every host-side flag of a save must be a CUDA tensor: a backend that refuses CPU tensors, as
    NCCL does, stands in (its tensors live on the meta device here, read back as all-ones)."""
    import torch
    import torch.distributed as dist

    from megalm.parallel import state
    from megalm.training.checkpoint import CheckpointError, PendingSave

    def refuse_cpu(tensor, op=None, group=None, async_op=False):
        if tensor.device.type == "cpu":
            raise RuntimeError("No backend type associated with device type cpu")
        assert tensor.device.type == "meta"

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "all_reduce", refuse_cpu)
    monkeypatch.setattr(state, "collective_device", lambda: torch.device("meta"))
    monkeypatch.setattr(state, "_to_host", lambda t: [1.0] * t.numel())
    pending = PendingSave.__new__(PendingSave)
    pending.thread, pending.error, pending.tmp = None, "disk full", "/ckpt/iter_0000002.tmp"
    pending.topo, pending.iteration, pending.root = state.Topology(), 2, "/ckpt"
    assert pending.done_everywhere()
    with pytest.raises(CheckpointError, match=r"iteration 2 failed on rank\(s\) 0 \(disk full\)"):
        pending.finish()


@pytest.mark.parametrize("cp_rank", [0, 1])
def test_allgather_cp_mask_is_built_where_the_activations_are(cp_rank):
    """The all-gather CP causal mask follows the activations' device (meta stands in for CUDA here), and says
    the same as on the CPU."""
    import types

    import torch

    from megalm.parallel.context import attention_mask

    topo = types.SimpleNamespace(cp=2, cp_rank=cp_rank, cp_group=None)
    cpu = attention_mask("allgather", 4, topo, None, torch.device("cpu"))
    assert attention_mask("allgather", 4, topo, None, torch.device("meta")).device.type == "meta"
    queries = [0, 1, 6, 7] if cp_rank == 0 else [2, 3, 4, 5]
    assert torch.equal(cpu[0, 0], torch.arange(8)[None, :] <= torch.tensor(queries)[:, None])
    assert attention_mask("a2a", 4, topo, None, torch.device("meta")) is None


@pytest.mark.slow
def test_dropout_streams_differ_across_stages_and_cp_ranks(tmp_path, dataset_prefix, bpe_flags):
    """TP 2 x CP 2 x PP 2 through torchrun, saved before any draw: the default generator (replicated activations)
    is the same on the two TP ranks of a stage and CP rank and differs between every stage and CP rank; each
    rank's TP tracker differs from every other rank's. (All eight drew the same masks per TP rank before.)"""
    import itertools
    import os

    import torch

    from conftest import tiny_train_flags, torchrun

    flags = tiny_train_flags(dataset_prefix, bpe_flags, "--train-iters", "1", "--tensor-model-parallel-size", "2",
                             "--context-parallel-size", "2", "--pipeline-model-parallel-size", "2",
                             "--sequence-parallel", "--global-batch-size", "2", "--lr-warmup-iters", "0",
                             "--save", tmp_path / "ck")
    res = torchrun(8, "megalm/pretrain.py", *flags)
    assert res.returncode == 0, res.stderr[-3000:]
    folder = os.path.join(tmp_path, "ck", "iter_0000001")
    rng = {(tp, pp, cp): torch.load(os.path.join(folder, f"rng-tp{tp:02d}-pp{pp:03d}-dp00000"
                                                         + (f"-cp{cp:02d}" if cp else "") + ".pt"), weights_only=True)
           for tp, pp, cp in itertools.product(range(2), range(2), range(2))}
    for (a, ra), (b, rb) in itertools.combinations(rng.items(), 2):
        same_default = torch.equal(ra["torch"], rb["torch"])
        assert same_default == (a[1:] == b[1:]), (a, b)
        assert not torch.equal(ra["tracker"]["cpu"], rb["tracker"]["cpu"]), (a, b)


def test_legacy_language_model_encoder_tp2_joins_every_shard(tmp_path):
    """A legacy TP 2 checkpoint in the old ``language_model.encoder`` spelling: the fused QKV and the first MLP
    layer join along rows, the projections along columns, SwiGLU per half; nothing is rank 0's shard alone."""
    import argparse

    import torch

    from megalm.interop.megatron_format import read_legacy

    g = torch.Generator().manual_seed(0)
    whole = {"self_attention.query_key_value.weight": torch.randn(12, 4, generator=g),
             "self_attention.dense.weight": torch.randn(4, 4, generator=g),
             "mlp.dense_h_to_4h.weight": torch.randn(16, 4, generator=g),
             "mlp.dense_4h_to_h.weight": torch.randn(4, 8, generator=g),
             "input_layernorm.weight": torch.randn(4, generator=g)}
    gate, up = whole["mlp.dense_h_to_4h.weight"].chunk(2)
    for t in range(2):
        layer = {"self_attention.query_key_value.weight": whole["self_attention.query_key_value.weight"].chunk(2)[t],
                 "self_attention.dense.weight": whole["self_attention.dense.weight"].chunk(2, 1)[t],
                 "mlp.dense_h_to_4h.weight": torch.cat([gate.chunk(2)[t], up.chunk(2)[t]]),
                 "mlp.dense_4h_to_h.weight": whole["mlp.dense_4h_to_h.weight"].chunk(2, 1)[t],
                 "input_layernorm.weight": whole["input_layernorm.weight"]}
        model = {"language_model": {"encoder": {f"layers.0.{k}": v for k, v in layer.items()}}}
        os.makedirs(tmp_path / f"mp_rank_0{t}")
        torch.save({"model": model, "args": argparse.Namespace(swiglu=True, num_layers=1)},
                   tmp_path / f"mp_rank_0{t}" / "model_optim_rng.pt")
    _, tensors = read_legacy(str(tmp_path))
    for name, tensor in whole.items():
        assert torch.equal(tensors[f"language_model.encoder.layers.0.{name}"], tensor), name


# ---- bad input: one line naming the file, nothing written -------------------------------------------------------

@pytest.fixture(scope="module")
def saved(tmp_path_factory, dataset_prefix, bpe_flags):
    """A one-iteration checkpoint of the tiny GPT (in this process)."""
    from conftest import tiny_train_flags
    from megalm.pretrain import main

    root = tmp_path_factory.mktemp("hardening-ck") / "ck"
    assert main(tiny_train_flags(dataset_prefix, bpe_flags, "--train-iters", "1", "--lr-warmup-iters", "0",
                                 "--save", str(root))) == 0
    return root


def _copy(saved, tmp_path):
    import shutil

    shutil.copytree(saved, tmp_path / "ck")
    return tmp_path / "ck", tmp_path / "ck" / "iter_0000001"


def _one_line_error(main, argv, capsys, match):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert match in err, err
    return err


@pytest.mark.parametrize("damage, match", [
    (lambda d: (d / "meta.json").write_text("{not json"), "meta.json: unreadable"),
    (lambda d: (d / "meta.json").write_text("[]"), "meta.json: lacks checksums, shards, iteration"),
    (lambda d: _drop_checksum(d, "config.yaml"), "config.yaml: meta.json records no checksum for it"),
])
def test_damaged_checkpoint_stops_with_the_file_named(saved, tmp_path, capsys, damage, match):
    from megalm.interop.hf import export_main

    root, it = _copy(saved, tmp_path)
    damage(it)
    _one_line_error(export_main, ["--load", str(root), "--output", str(tmp_path / "hf")], capsys, match)
    assert not os.path.exists(tmp_path / "hf")


def _drop_checksum(folder, name):
    import json

    meta = json.loads((folder / "meta.json").read_text())
    del meta["checksums"][name]
    (folder / "meta.json").write_text(json.dumps(meta))


def test_prune_with_a_bad_pointer_removes_nothing(saved, tmp_path, caplog):
    import shutil

    from megalm.training.checkpoint_dirs import LATEST, prune

    root, it = _copy(saved, tmp_path)
    shutil.copytree(it, root / "iter_0000000")
    (root / LATEST).write_text("banana")
    prune(str(root), 1)
    assert sorted(os.listdir(root)) == sorted(["iter_0000000", "iter_0000001", LATEST])
    assert "expected an iteration number, found 'banana'" in caplog.text


def test_megatron_pointer_and_args_without_shape(tmp_path, capsys):
    import argparse

    import torch

    from megalm.interop.megatron import import_main

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "latest_checkpointed_iteration.txt").write_text("ten")
    _one_line_error(import_main, ["--load", str(tmp_path / "m"), "--save", str(tmp_path / "out")], capsys,
                    "latest_checkpointed_iteration.txt: expected an iteration number or 'release', found 'ten'")
    rank = tmp_path / "legacy" / "mp_rank_00"
    rank.mkdir(parents=True)
    torch.save({"model": {"decoder.final_layernorm.weight": torch.ones(4)},
                "args": argparse.Namespace(num_layers=2, num_attention_heads=4)}, rank / "model_optim_rng.pt")
    _one_line_error(import_main, ["--load", str(tmp_path / "legacy"), "--save", str(tmp_path / "out")], capsys,
                    "args lack the model's shape: hidden_size")
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("config, match", [
    ("{broken", "config.json: not valid JSON"),
    ('{"model_type": "llama", "hidden_size": 64}', "config.json: lacks 'num_hidden_layers'"),
    ('{"model_type": "gpt2", "n_layer": 2, "n_embd": 30, "n_head": 4, "n_positions": 32}',
     "config.json: --hidden-size 30 is not divisible by --num-attention-heads 4"),
    ('["gpt2"]', "config.json: expected a JSON object"),
])
def test_malformed_hf_config_writes_nothing(tmp_path, bpe_dir, capsys, config, match):
    import shutil

    from megalm.interop.hf import import_main

    src = tmp_path / "hf"
    src.mkdir()
    (src / "config.json").write_text(config)
    for f in ("vocab.json", "merges.txt"):
        shutil.copy(os.path.join(bpe_dir, f), src / f)
    _one_line_error(import_main, ["--input", str(src), "--save", str(tmp_path / "out")], capsys, match)
    assert not os.path.exists(tmp_path / "out")  # the tokenizer files were copied before anything was checked
