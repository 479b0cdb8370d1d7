"""Supervised fine-tuning data and loss: only what the model must write carries loss, the common JSONL shapes give
the same examples, packing leaves padding only at the end of samples and keeps examples apart, and the loss falls."""
import json
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from chat_data import tiny_tokenizer
from conftest import tiny_train_flags, torchrun
from megalm.config import load_config
from megalm.data.gpt_dataset import DatasetError
from megalm.data.loader import collate
from megalm.data.sft import PackedDataset, pack, tokenize_examples
from megalm.data.tokenizers import HuggingFaceTokenizer, build_tokenizer
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
        for _ in range(n):
            words = rng.sample(WORDS, 3)
            fh.write(json.dumps({"prompt": "reverse: " + " ".join(words) + " =>",
                                 "response": " " + " ".join(words[::-1])}) + "\n")
    return path


def sft_flags(bpe_flags, data, *extra):
    flags = tiny_train_flags("unused", bpe_flags, *extra)
    i = flags.index("--data-path")
    return [str(f) for f in flags[:i] + flags[i + 2:]] + ["--sft-data", str(data)]


def test_prompt_tokens_carry_no_loss(tmp_path, bpe_flags):
    cfg = load_config(sft_flags(bpe_flags, instruction_set(tmp_path / "sft.jsonl", 20)))
    tok = build_tokenizer(cfg.data)
    examples = tokenize_examples(cfg.data.sft_data, tok)
    line = json.loads(open(cfg.data.sft_data).readline())
    ids, targets = examples[0]
    prompt = tok.tokenize(line["prompt"])
    assert ids.tolist() == tok.tokenize(line["prompt"] + line["response"]) + [tok.eod]
    assert targets[: len(prompt)].sum() == 0 and targets[len(prompt):].min() == 1
    data = PackedDataset(pack(examples, 32), seed=0)
    batch = collate(data, range(4))
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


def test_shapes_give_the_same_conversation(tmp_path):
    """alpaca, sharegpt and messages lines holding one exchange render to the same ids and targets through the
    chat template; alpaca without a template is the Alpaca prompt as plain text."""
    tok = HuggingFaceTokenizer(tiny_tokenizer(tmp_path / "tok", "qwen3"))
    template = tok.chat_template()
    lines = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why?\n\nThe sky."},
                           {"role": "assistant", "content": "The sun."}]},
             {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Why?\n\nThe sky."},
                                {"from": "gpt", "value": "The sun."}]},
             {"instruction": "Why?", "input": "The sky.", "output": "The sun.", "system": "Be brief."}]
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    (a, ma), (b, mb), (c, mc) = tokenize_examples(str(path), tok, "auto", template)
    assert a.tolist() == b.tolist() == c.tolist() and ma.tolist() == mb.tolist() == mc.tolist()
    assert tok.detokenize([i for i, m in zip(a, ma) if m]).endswith("The sun.<|im_end|>\n")
    alpaca = tmp_path / "alpaca.jsonl"
    alpaca.write_text(json.dumps(lines[2]) + "\n")
    (d, md), = tokenize_examples(str(alpaca), tok, "alpaca", None)
    text = tok.detokenize(d.tolist())
    assert "### Instruction:\nWhy?\n\n### Input:\nThe sky.\n\n### Response:\n" in text
    assert tok.detokenize([i for i, m in zip(d, md) if m]) == "The sun.<|im_end|>"  # the end of document: its eos
    with pytest.raises(DatasetError, match=f"{path}:1: no 'instruction', 'output' \\(--sft-format alpaca\\)"):
        tokenize_examples(str(path), tok, "alpaca", template)


def test_packing_fills_samples_and_keeps_examples_apart():
    rng = np.random.default_rng(0)
    examples = [(np.arange(n), np.ones(n, dtype=np.uint8)) for n in rng.integers(3, 40, size=300)]
    out = pack(examples, 63)
    tokens = sum(len(ids) for ids, _ in examples)
    assert out["ids"].shape[1] == 64
    assert tokens / out["ids"].size > 0.98  # best fit: under 2% padding (greedy, in order: 22% here)
    for s in range(len(out["ids"])):
        docs = out["docs"][s]
        for d in np.unique(docs):
            run, targets = out["ids"][s][docs == d], out["targets"][s][docs == d]
            if run.sum() == 0 and targets.sum() == 0:
                continue  # the padding at the end
            assert run.tolist() == list(range(len(run)))  # each example whole and contiguous
            assert targets[0] == 0 and targets[1:].all()  # its first token is not predicted from another's
    batch = collate(PackedDataset(out, 0), range(3))
    starts = batch["position_ids"] == 0
    assert torch.equal(starts[:, 1:], batch["document_ids"][:, 1:] != batch["document_ids"][:, :-1])


def test_bad_examples_name_the_line(tmp_path, bpe_flags):
    cfg = load_config(sft_flags(bpe_flags, instruction_set(tmp_path / "sft.jsonl", 2)))
    tok = build_tokenizer(cfg.data)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "half \\ud83d", "response": "b"}\n')
    with pytest.raises(DatasetError, match=f"{bad}:2: the example holds an unpaired surrogate escape"):
        tokenize_examples(str(bad), tok)
    bad.write_text('{"prompt": "a"}\n')
    with pytest.raises(DatasetError, match=f"{bad}:1: a prompt needs a 'response'"):
        tokenize_examples(str(bad), tok)
    bad.write_text('{"prompt": "a", "response": "b"}\n')
    with pytest.raises(DatasetError, match=f"{bad}:1: no 'messages' \\(--sft-format messages\\)"):
        tokenize_examples(str(bad), tok, "messages")


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


def test_sft_loss_falls(tmp_path, bpe_flags):
    data = instruction_set(tmp_path / "sft.jsonl")
    flags = sft_flags(bpe_flags, data, "--train-iters", "30", "--lr", "3e-3", "--num-layers", "2",
                      "--eval-interval", "30")
    assert main(flags + ["--metrics-file", str(tmp_path / "one.jsonl")]) == 0
    one = [r for r in map(json.loads, open(tmp_path / "one.jsonl")) if "loss" in r]
    assert sum(r["loss"] for r in one[-5:]) < 0.7 * sum(r["loss"] for r in one[:5])


def test_datasets_are_cached_and_shared_out(tmp_path, bpe_flags):
    """Each rank tokenizes its share of the lines; the packed result is cached and read back by the next run; a
    bad line stops every rank, named."""
    from megalm.training.finetune import cached_build

    data = instruction_set(tmp_path / "sft.jsonl", 40)
    calls = []

    def parse(example, where):
        calls.append(where)
        return np.arange(3) + len(calls), np.ones(3, dtype=np.uint8)

    key = {"file": str(data)}
    first = cached_build(str(tmp_path / "cache"), key, str(data), parse, lambda ex: {"train": pack(ex, 15)}, 0, 1)
    assert len(calls) == 40
    again = cached_build(str(tmp_path / "cache"), key, str(data), parse, lambda ex: {"train": pack(ex, 15)}, 0, 1)
    assert len(calls) == 40 and isinstance(again["train"]["ids"], np.memmap)  # read back, not parsed again
    assert np.array_equal(first["train"]["ids"], again["train"]["ids"])
    lines = data.read_text().splitlines()
    lines[2] = '{"prompt": "no response"}'
    data.write_text("\n".join(lines) + "\n")
    flags = sft_flags(bpe_flags, data, "--train-iters", "2")
    res = torchrun(2, "megalm/pretrain.py", *flags)
    assert res.returncode != 0
    assert res.stderr.count(f"{data}:3: a prompt needs a 'response'") == 2, res.stderr[-2000:]  # from both ranks
    lines[2] = lines[3]
    data.write_text("\n".join(lines) + "\n")
    res = torchrun(2, "megalm/pretrain.py", *flags, "--metrics-file", tmp_path / "two.jsonl")
    assert res.returncode == 0, res.stderr[-2000:]
    assert main(flags + ["--metrics-file", str(tmp_path / "one.jsonl")]) == 0  # the cache both ranks built
    one, two = ([r["loss"] for r in map(json.loads, open(tmp_path / f)) if "loss" in r] for f in ("one.jsonl",
                                                                                                   "two.jsonl"))
    assert one == pytest.approx(two, rel=1e-5)
