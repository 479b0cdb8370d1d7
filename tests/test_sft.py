"""Supervised fine-tuning: loss only on responses, packed examples isolated from each other, loss falls, and the
same losses under TP 2 x PP 2 as in one process."""
import json
import random
from types import SimpleNamespace

import pytest
import torch

from conftest import tiny_train_flags, torchrun
from megalm.config import load_config
from megalm.data.gpt_dataset import DatasetError
from megalm.data.loader import collate
from megalm.data.sft import SFTDataset, pack, tokenize_examples
from megalm.data.tokenizers import build_tokenizer
from megalm.model.gpt import GPT
from megalm.parallel.state import Topology
from megalm.pretrain import main
from megalm.training.trainer import Trainer
from parity import VOCAB, parity_model_config

WORDS = "alpha beta gamma delta epsilon zeta theta kappa lambda sigma".split()


def instruction_set(path, n=300, seed=0):
    """Reverse a list of words: learnable by a tiny model, with the answer determined by the prompt."""
    rng = random.Random(seed)
    with open(path, "w") as fh:
        for i in range(n):
            words = rng.sample(WORDS, 3)
            if i % 2:
                ex = {"prompt": "reverse: " + " ".join(words) + " =>", "response": " " + " ".join(words[::-1])}
            else:
                ex = {"messages": [{"role": "user", "content": "reverse " + " ".join(words)},
                                   {"role": "assistant", "content": " ".join(words[::-1])}]}
            fh.write(json.dumps(ex) + "\n")
    return path


def sft_flags(bpe_flags, data, *extra):
    flags = tiny_train_flags("unused", bpe_flags, *extra)
    i = flags.index("--data-path")
    return [str(f) for f in flags[:i] + flags[i + 2:]] + ["--sft-data", str(data)]


def test_prompt_tokens_carry_no_loss(tmp_path, bpe_flags):
    cfg = load_config(sft_flags(bpe_flags, instruction_set(tmp_path / "sft.jsonl", 20)))
    tok = build_tokenizer(cfg.data)
    examples = tokenize_examples(cfg.data.sft_data, tok)
    ids, weights = examples[1]  # a prompt/response example
    prompt = tok.tokenize("reverse: " + json.loads(open(cfg.data.sft_data).readlines()[1])["prompt"][9:])
    assert weights[: len(prompt)].sum() == 0 and weights[len(prompt):].min() == 1 and ids[-1] == tok.eod
    data = SFTDataset(pack(examples, 32, tok.eod), seed=0)
    batch = collate(data, range(4), eod=tok.eod, reset_position_ids=True, reset_attention_mask=True)
    mask = batch["loss_mask"]
    assert 0 < mask.sum() < mask.numel()
    model = GPT(cfg.model, tok.vocab_size)
    model.init_weights(0)

    trainer = SimpleNamespace(device=torch.device("cpu"), topo=Topology())  # what Trainer.masked_mean reads

    def loss(labels):  # the trainer's own reduction of per-token losses
        per_token = model(batch["tokens"], labels, batch["position_ids"], document_ids=batch["document_ids"])
        return Trainer.masked_mean(trainer, per_token, batch)

    changed = batch["labels"].clone()
    changed[mask == 0] = (changed[mask == 0] + 7) % tok.vocab_size  # relabel every prompt position
    assert torch.equal(loss(batch["labels"]), loss(changed))
    changed[mask == 1] = (changed[mask == 1] + 7) % tok.vocab_size
    assert not torch.equal(loss(batch["labels"]), loss(changed))


def test_bad_examples_name_the_line(tmp_path, bpe_flags):
    cfg = load_config(sft_flags(bpe_flags, instruction_set(tmp_path / "sft.jsonl", 2)))
    tok = build_tokenizer(cfg.data)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "half \\ud83d", "response": "b"}\n')
    with pytest.raises(DatasetError, match=f"{bad}:2: the example holds an unpaired surrogate escape"):
        tokenize_examples(str(bad), tok)
    bad.write_text('{"prompt": "a"}\n')
    with pytest.raises(DatasetError, match=f"{bad}:1: expected 'prompt' and 'response', or 'messages'"):
        tokenize_examples(str(bad), tok)


def test_packed_documents_do_not_see_each_other():
    model = GPT(parity_model_config(position_embedding_type="rope"), VOCAB)
    model.init_weights(0)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(0, VOCAB - 1, (1, 5), generator=g), torch.randint(0, VOCAB - 1, (1, 7), generator=g)
    eod = torch.tensor([[VOCAB - 1]])
    packed = torch.cat([a, eod, b], dim=1)
    docs = torch.tensor([[0] * 6 + [1] * 7])
    positions = torch.tensor([list(range(6)) + list(range(7))])
    with torch.no_grad():
        together = model(packed, position_ids=positions, document_ids=docs)
        alone = model(b)
    assert (together[:, 6:] - alone).abs().max() < 1e-5


def test_sft_loss_falls_and_matches_under_tp_pp(tmp_path, bpe_flags):
    data = instruction_set(tmp_path / "sft.jsonl")
    flags = sft_flags(bpe_flags, data, "--train-iters", "30", "--lr", "3e-3", "--num-layers", "2",
                      "--eval-interval", "30")
    assert main(flags + ["--metrics-file", str(tmp_path / "one.jsonl")]) == 0
    one = [r for r in map(json.loads, open(tmp_path / "one.jsonl")) if "loss" in r]
    assert sum(r["loss"] for r in one[-5:]) < 0.7 * sum(r["loss"] for r in one[:5])
    short = sft_flags(bpe_flags, data, "--train-iters", "4", "--lr", "3e-3", "--num-layers", "2",
                      "--eval-interval", "30")
    res = torchrun(4, "megalm/pretrain.py", *short, "--metrics-file", tmp_path / "tp.jsonl",
                   "--tensor-model-parallel-size", "2",
                   "--pipeline-model-parallel-size", "2", "--sequence-parallel")
    assert res.returncode == 0, res.stderr[-3000:]
    tp = [r for r in map(json.loads, open(tmp_path / "tp.jsonl")) if "loss" in r]
    assert main(short + ["--metrics-file", str(tmp_path / "ref.jsonl")]) == 0
    ref = [r for r in map(json.loads, open(tmp_path / "ref.jsonl")) if "loss" in r]
    assert len(tp) == len(ref) == 4
    for x, y in zip(ref, tp, strict=True):
        assert abs(x["loss"] - y["loss"]) / x["loss"] < 1e-5
