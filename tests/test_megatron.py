"""Megatron-LM checkpoints into megalm, against megatron-core as the peer (tests/megatron_peer.py builds, saves
and runs its GPTModel on CPU): logits equal megatron-core's forward for both flavours, both formats, TP 1 and 2;
a Megatron run continues in megalm at another TP/PP at the same data position as megatron-core's GPTDataset;
bad checkpoints stop with the file and tensor named, nothing written."""
import json
import os

import pytest
import torch

from conftest import ROOT, require, torchrun
from megalm.generate import load_for_inference
from megalm.parallel.state import Topology
from megalm.interop.megatron import import_main

require("megatron.core")


def peer(nproc, *args):
    res = torchrun(nproc, "tests/megatron_peer.py", *args, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    path = tmp_path_factory.mktemp("megatron-tokens") / "tokens.pt"
    torch.save(torch.randint(0, 1000, (1, 24), generator=torch.Generator().manual_seed(0)), path)
    return path


def megatron_checkpoint(tmp, tokens, bpe_dir, dataset_prefix, flavour, fmt, tp):
    """A Megatron-LM save directory written by megatron-core at ``tp``, and its logits on ``tokens``."""
    tmp.mkdir(parents=True, exist_ok=True)
    peer(tp, "--flavour", flavour, "--format", fmt, "--save", tmp / "megatron", "--logits", tmp / "logits.pt",
         "--tokens", tokens, "--vocab-size", "1024", "--vocab-file", f"{bpe_dir}/vocab.json", "--merge-file",
         f"{bpe_dir}/merges.txt", "--data-path", dataset_prefix)
    return tmp / "megatron", torch.load(tmp / "logits.pt")


@pytest.mark.parametrize("flavour, fmt, tp", [("gpt2", "torch_dist", 1), ("gpt2", "torch_dist", 2),
                                              ("llama", "torch_dist", 1), ("llama", "torch_dist", 2),
                                              ("gpt2", "torch", 2), ("llama", "torch", 2),
                                              ("llama-rotary-half", "torch_dist", 2)])
def test_import_gives_megatron_cores_logits(tmp_path, tokens, bpe_dir, dataset_prefix, flavour, fmt, tp):
    """GPT-2 (learned positions, LayerNorm, GELU, biases, tied) and Llama (GQA, SwiGLU, RoPE, RMSNorm, untied)
    flavours, saved by megatron-core in torch_dist and in the legacy per-rank layout: megalm's logits on the same
    tokens within 1e-4 of megatron-core's forward; iteration and consumed samples carried over."""
    save, logits = megatron_checkpoint(tmp_path, tokens, bpe_dir, dataset_prefix, flavour, fmt, tp)
    assert import_main(["--load", str(save), "--save", str(tmp_path / "ck")]) == 0
    model, _ = load_for_inference(str(tmp_path / "ck"), Topology(), {})
    with torch.no_grad():
        ours = model(torch.load(tokens))
    assert (ours - logits).abs().max().item() < 1e-4
    meta = json.loads((tmp_path / "ck" / "iter_0000010" / "meta.json").read_text())
    assert meta["iteration"] == 10 and meta["consumed_samples"] == 40 and meta["megatron_format"] == fmt


RECORD_BATCHES = """
import sys
sys.path.insert(0, {root!r})
import torch
import torch.distributed as dist
import megalm.training.trainer as trainer
real = trainer.global_batch
calls = []

def recorded(*args, **kwargs):
    batches = real(*args, **kwargs)
    if not calls and (not dist.is_initialized() or dist.get_rank() == 0):
        torch.save(torch.cat([b["tokens"] for b in batches]), {out!r})
    calls.append(1)
    return batches

trainer.global_batch = recorded
from megalm.pretrain import main
sys.exit(main(sys.argv[1:]))
"""


def test_megatron_run_continues_in_megalm_at_its_data_position(tmp_path, tokens, bpe_dir, bpe_flags, dataset_prefix):
    """Imported at iteration 10 with 40 samples consumed (TP 2, torch_dist), continued in megalm at TP 2 x PP 2:
    its next global batch is samples 40..43 of megatron-core's GPTDataset built from the same data, split, seed and
    sample count; the run trains on from iteration 11."""
    save, _ = megatron_checkpoint(tmp_path, tokens, bpe_dir, dataset_prefix, "llama", "torch_dist", 2)
    assert import_main(["--load", str(save), "--save", str(tmp_path / "ck")]) == 0
    script = tmp_path / "record.py"
    script.write_text(RECORD_BATCHES.format(root=ROOT, out=str(tmp_path / "batch.pt")))
    flags = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--num-query-groups", "2",
             "--ffn-hidden-size", "64", "--seq-length", "32", "--max-position-embeddings", "64",
             "--position-embedding-type", "rope", "--normalization", "RMSNorm", "--swiglu",
             "--untie-embeddings-and-output-weights", "--disable-bias-linear", "--micro-batch-size", "2",
             "--global-batch-size", "4", "--train-iters", "100", "--exit-interval", "12", "--split", "90,10,0",
             "--seed", "1234", "--eval-interval", "1000", "--data-path", dataset_prefix, *bpe_flags,
             "--load", str(tmp_path / "ck"), "--no-load-optim", "--no-load-rng", "--save", str(tmp_path / "more"),
             "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
             "--metrics-file", str(tmp_path / "m.jsonl")]
    res = torchrun(4, str(script), *flags)
    assert res.returncode == 0, res.stderr[-3000:]
    iterations = [r["iteration"] for r in map(json.loads, open(tmp_path / "m.jsonl")) if "loss" in r]
    assert iterations == [11, 12]
    ours = torch.load(tmp_path / "batch.pt")

    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megalm.data.tokenizers import GPT2BPETokenizer

    tok = GPT2BPETokenizer(f"{bpe_dir}/vocab.json", f"{bpe_dir}/merges.txt")

    class Tokenizer:  # what megatron-core's GPTDataset asks of a tokenizer
        eod, pad, vocab_size, unique_identifiers = tok.eod, -1, tok.vocab_size, {"class": "megalm-test"}

    config = GPTDatasetConfig(random_seed=1234, sequence_length=32, blend=([dataset_prefix], None), split="90,10,0",
                              path_to_cache=str(tmp_path / "mcore-cache"), tokenizer=Tokenizer(),
                              reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False)
    train, _, _ = BlendedMegatronDatasetBuilder(GPTDataset, [400, 0, 0], lambda: True, config).build()
    theirs = torch.stack([torch.as_tensor(train[i]["tokens"]) for i in range(40, 44)])
    assert torch.equal(ours, theirs.to(ours.dtype))


def _fails(tmp_path, capsys, load, *named):
    out = tmp_path / "out"
    assert import_main(["--load", str(load), "--save", str(out)]) == 2
    err = capsys.readouterr().err
    for text in named:
        assert text in err, err
    assert not os.path.exists(out / "latest_checkpointed_iteration.txt")


def test_bad_megatron_checkpoints_name_the_problem(tmp_path, tokens, bpe_dir, dataset_prefix, capsys):
    """An unknown layout, an unknown tensor name, shapes that disagree with args and a truncated .distcp each stop
    with the file and the tensor, and write nothing."""
    empty = tmp_path / "empty" / "iter_0000001"
    empty.mkdir(parents=True)
    _fails(tmp_path, capsys, empty, "neither a torch_dist checkpoint", "mp_rank_XX")

    legacy, _ = megatron_checkpoint(tmp_path / "legacy", tokens, bpe_dir, dataset_prefix, "gpt2", "torch", 1)
    assert import_main(["--load", str(legacy), "--save", str(tmp_path / "out"), "--vocab-file",
                        str(tmp_path / "missing.json"), "--merge-file", f"{bpe_dir}/merges.txt"]) == 2
    assert "--vocab-file: " in capsys.readouterr().err and not (tmp_path / "out").exists()
    rank_file = legacy / "iter_0000010" / "mp_rank_00" / "model_optim_rng.pt"
    obj = torch.load(rank_file, weights_only=False)
    original = dict(obj)
    obj["model"] = dict(obj["model"])
    obj["model"]["decoder.layers.0.self_attention.rotary_table"] = torch.zeros(3)
    torch.save(obj, rank_file)
    _fails(tmp_path, capsys, legacy, "tensor decoder.layers.0.self_attention.rotary_table is not part of")

    args = original["args"]
    args.num_attention_heads = 2
    torch.save(dict(original, args=args), rank_file)
    _fails(tmp_path, capsys, legacy, "decoder.layers.0.self_attention.linear_qkv.weight has 96 rows; args give")

    dist_save, _ = megatron_checkpoint(tmp_path / "dist", tokens, bpe_dir, dataset_prefix, "gpt2", "torch_dist", 1)
    folder = dist_save / "iter_0000010"
    victim = max((f for f in os.listdir(folder) if f.endswith(".distcp")), key=lambda f: os.path.getsize(folder / f))
    with open(folder / victim, "r+b") as fh:
        fh.truncate(os.path.getsize(folder / victim) // 2)
    _fails(tmp_path, capsys, dist_save, str(folder / victim), "(truncated)")

    (folder / ".metadata").write_bytes(b"\x80\x04cos\nsystem\n.")  # a pickle that would call os.system
    _fails(tmp_path, capsys, dist_save, "os.system is not part of a checkpoint's metadata")


def test_export_loads_in_megatron_core(tmp_path, tokens, bpe_dir, bpe_flags, dataset_prefix):
    """A model trained in megalm at TP 2 x PP 2 (the Llama flavour), exported to torch_dist: megatron-core's
    dist_checkpointing.load puts it into its GPTModel at TP 2, whose forward gives megalm's logits; the GPT-2
    flavour the same way after a round trip from megatron-core (imported at TP 1, exported, loaded at TP 2)."""
    from megalm.interop.megatron import export_main

    flags = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--num-query-groups", "2",
             "--ffn-hidden-size", "64", "--seq-length", "32", "--max-position-embeddings", "64",
             "--position-embedding-type", "rope", "--normalization", "RMSNorm", "--swiglu",
             "--untie-embeddings-and-output-weights", "--disable-bias-linear", "--micro-batch-size", "2",
             "--global-batch-size", "4", "--train-iters", "3", "--lr", "3e-3", "--eval-interval", "1000",
             "--split", "90,10,0", "--data-path", dataset_prefix, *bpe_flags, "--save", str(tmp_path / "trained"),
             "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]
    res = torchrun(4, "megalm/pretrain.py", *flags)
    assert res.returncode == 0, res.stderr[-3000:]
    gpt2, _ = megatron_checkpoint(tmp_path / "gpt2", tokens, bpe_dir, dataset_prefix, "gpt2", "torch_dist", 1)
    assert import_main(["--load", str(gpt2), "--save", str(tmp_path / "gpt2-ck")]) == 0
    for flavour, ck in (("llama", tmp_path / "trained"), ("gpt2", tmp_path / "gpt2-ck")):
        out = tmp_path / f"{flavour}-megatron"
        assert export_main(["--load", str(ck), "--save", str(out), "--tensor-model-parallel-size", "2"]) == 0
        folder = next(out.glob("iter_*"))
        assert (out / "latest_checkpointed_iteration.txt").read_text() == folder.name[len("iter_"):].lstrip("0")
        peer(2, "--flavour", flavour, "--load-dir", folder, "--logits", tmp_path / f"{flavour}.pt", "--tokens",
             tokens, "--vocab-size", "1024")
        model, _ = load_for_inference(str(ck), Topology(), {})
        with torch.no_grad():
            ours = model(torch.load(tokens))
        assert (ours - torch.load(tmp_path / f"{flavour}.pt")).abs().max().item() < 1e-4, flavour


@pytest.mark.parametrize("spec", ["te", "local"])
def test_megatron_names_both_ways(spec):
    """The TE spec's folded norm names and the older local spec's unfolded ones: megalm -> Megatron -> megalm is
    the identity (also with biases, QK norms and grouped queries); each spec's norm names are the ones expected."""
    from megalm.config import Config, finalize
    from megalm.model.gpt import GPT
    from megalm.interop.megatron import canonical_names, to_megalm, to_megatron
    from megalm.interop.megatron_format import unstack_layers

    cfg = Config()
    cfg.data.tokenizer_type, cfg.data.vocab_size = "NullTokenizer", 99
    m = cfg.model
    m.num_layers, m.hidden_size, m.num_attention_heads, m.num_query_groups = 2, 32, 4, 2
    m.swiglu, m.qk_layernorm, m.position_embedding_type, m.normalization = True, True, "rope", "RMSNorm"
    finalize(cfg)
    torch.manual_seed(0)
    state = {n: torch.randn(p.shape) for n, p in GPT(m, 100).named_parameters()}
    state["embedding.weight"] = state["embedding.weight"][:100]  # checkpoints hold the unpadded vocabulary
    theirs = to_megatron(state, m, 128, spec)
    norms = {"te": "decoder.layers.self_attention.linear_qkv.layer_norm_weight",
             "local": "decoder.layers.input_layernorm.weight"}
    assert norms[spec] in theirs and theirs["embedding.word_embeddings.weight"].shape == (128, 32)
    assert theirs["decoder.layers.self_attention.linear_qkv.weight"].shape == (2, (4 + 2 * 2) * 8, 32)
    back = to_megalm(canonical_names(unstack_layers(theirs), "test"), m, 100, "test")
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
