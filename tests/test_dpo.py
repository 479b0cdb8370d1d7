"""DPO against TRL: on the same transformers weights (a policy and a different reference) and the same preference
pairs, megalm's tokens equal ``DPOTrainer``'s and its loss, chosen and rejected rewards for a batch equal TRL's loss
computation (sigmoid and IPO) within 1e-5; the reference log-probabilities come from a file a first pass over the
reference model wrote. A resumed run keeps its reference; bad pairs are refused with their line."""
import json
import os

import pytest
import torch

from chat_data import tiny_tokenizer
from conftest import require
from megalm.data.gpt_dataset import DatasetError
from megalm.data.preference import split_pair, tokenize_pair
from megalm.data.tokenizers import HuggingFaceTokenizer
from megalm.interop.hf import import_hf
from megalm.pretrain import main
from megalm.training.checkpoint_dirs import CheckpointError
from megalm.training.dpo import read_reference

WORDS = ("red", "blue", "sun", "moon")
CONVERSATIONAL = [{"prompt": [{"role": "user", "content": f"say {w}"}],
                   "chosen": [{"role": "assistant", "content": f"{w} {w}"}],
                   "rejected": [{"role": "assistant", "content": "no"}]} for w in WORDS]
TEXT = [{"prompt": f"Say {w}:", "chosen": f" {w} {w}.", "rejected": " No."} for w in WORDS]


def llama(transformers, vocab: int, seed: int):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tokenizer with Llama 3.1's template and two transformers models on it, each imported into megalm."""
    transformers = require("transformers")
    root = tmp_path_factory.mktemp("dpo")
    folders = {}
    for name, seed in (("policy", 0), ("reference", 1)):
        folder = root / name
        tiny_tokenizer(folder, "llama3_1")
        llama(transformers, len(transformers.AutoTokenizer.from_pretrained(folder)), seed).save_pretrained(folder)
        import_hf(str(folder), str(root / f"{name}-megalm"))
        folders[name] = folder
    return root, folders


def trl_batch_metrics(models, pairs, loss_type):
    """TRL's loss and rewards for one batch holding every pair, and its tokenized dataset."""
    transformers, trl, datasets = require("transformers"), require("trl"), require("datasets")
    root, folders = models
    tok = transformers.AutoTokenizer.from_pretrained(folders["policy"])
    tok.pad_token = tok.eos_token
    args = trl.DPOConfig(output_dir=str(root / "trl"), per_device_train_batch_size=len(pairs), beta=0.1,
                         loss_type=loss_type, report_to=[], use_cpu=True, max_length=None, bf16=False)  # fp32
    trainer = trl.DPOTrainer(model=transformers.AutoModelForCausalLM.from_pretrained(folders["policy"]),
                             ref_model=transformers.AutoModelForCausalLM.from_pretrained(folders["reference"]),
                             args=args, train_dataset=datasets.Dataset.from_list(pairs), processing_class=tok)
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch).item()
    metrics = {k: v[-1] for k, v in trainer._metrics["eval"].items()}  # eval mode: no dropout anywhere
    return loss, metrics, trainer.train_dataset


def megalm_first_step(models, tmp_path, data, loss_type):
    """megalm's first-iteration metrics on the policy, its reference log-probabilities written by a first pass
    over the reference model."""
    root, _ = models
    tok = root / "policy-megalm" / "tokenizer"
    common = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--num-query-groups", "2",
              "--ffn-hidden-size", "64", "--position-embedding-type", "rope", "--normalization", "RMSNorm",
              "--swiglu", "--untie-embeddings-and-output-weights", "--disable-bias-linear", "--norm-epsilon", "1e-6",
              "--seq-length", "256", "--max-position-embeddings", "256", "--micro-batch-size", "2",
              "--global-batch-size", "4", "--train-iters", "1", "--lr", "1e-3", "--split", "100,0,0",
              "--eval-iters", "0", "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(tok),
              "--dpo-data", str(data), "--dpo-beta", "0.1", "--dpo-loss", loss_type,
              "--dpo-reference-file", str(tmp_path / "reference.pt")]
    assert main(common + ["--pretrained-checkpoint", str(root / "reference-megalm")]) == 0  # writes the file
    assert main(common + ["--pretrained-checkpoint", str(root / "policy-megalm"), "--metrics-file",
                          str(tmp_path / "m.jsonl")]) == 0  # reads it
    return next(r for r in map(json.loads, open(tmp_path / "m.jsonl")) if "loss" in r)


@pytest.mark.parametrize("shape", ["conversational", "text"])
def test_tokens_equal_trl(models, shape):
    pairs = CONVERSATIONAL if shape == "conversational" else TEXT
    _, _, tokenized = trl_batch_metrics(models, pairs, "sigmoid")
    tok = HuggingFaceTokenizer(str(models[1]["policy"]))
    template = tok.chat_template()
    for example, theirs in zip(pairs, tokenized, strict=True):
        ours = tokenize_pair(*split_pair(example, "x"), tok, template, "x")
        assert ours == (theirs["prompt_ids"], theirs["chosen_ids"], theirs["rejected_ids"])


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_loss_and_rewards_equal_trl(models, tmp_path, loss_type):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in CONVERSATIONAL))
    loss, metrics, _ = trl_batch_metrics(models, CONVERSATIONAL, loss_type)
    row = megalm_first_step(models, tmp_path, data, loss_type)
    assert abs(row["loss"] - loss) < 1e-5 * max(1.0, abs(loss)), (row, loss)
    assert abs(row["dpo_rewards_chosen"] - metrics["rewards/chosen"]) < 1e-5
    assert abs(row["dpo_rewards_rejected"] - metrics["rewards/rejected"]) < 1e-5
    assert abs(row["dpo_rewards_margin"] - metrics["rewards/margins"]) < 1e-5
    assert row["dpo_rewards_accuracy"] == pytest.approx(metrics["rewards/accuracies"])
    assert abs(metrics["rewards/chosen"]) > 1e-3  # the policy is not the reference: nothing trivially zero
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps(p) + "\n" for p in CONVERSATIONAL[:3]))
    with pytest.raises(CheckpointError, match="reference.pt: the reference log-probabilities of other data"):
        read_reference(str(tmp_path / "reference.pt"), {"train": "another digest"})


def test_resumed_run_keeps_its_reference(tmp_path, models):
    """Stopped and resumed from its checkpoint (which holds the reference), a run's losses are the uninterrupted
    run's; with LoRA the reference is the base with the adapters off."""
    root, _ = models
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({**p, "prompt": [{"role": "user", "content": f"say {w} {i}"}]}) + "\n"
                            for i in range(6) for w, p in zip(WORDS, CONVERSATIONAL)))
    common = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--num-query-groups", "2",
              "--ffn-hidden-size", "64", "--position-embedding-type", "rope", "--normalization", "RMSNorm",
              "--swiglu", "--untie-embeddings-and-output-weights", "--disable-bias-linear", "--norm-epsilon", "1e-6",
              "--seq-length", "256", "--max-position-embeddings", "256", "--micro-batch-size", "2",
              "--global-batch-size", "4", "--train-iters", "6", "--lr", "1e-2", "--eval-iters", "0",
              "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model",
              str(root / "policy-megalm" / "tokenizer"), "--dpo-data", str(data), "--lora-rank", "4",
              "--pretrained-checkpoint", str(root / "policy-megalm"), "--log-interval", "1"]
    assert main(common + ["--metrics-file", str(tmp_path / "one.jsonl")]) == 0
    assert main(common + ["--exit-interval", "3", "--save", str(tmp_path / "ck")]) == 0
    assert os.path.isfile(tmp_path / "ck" / "iter_0000003" / "dpo_reference.pt")
    assert main(common + ["--load", str(tmp_path / "ck"), "--metrics-file", str(tmp_path / "two.jsonl")]) == 0
    one = [r for r in map(json.loads, open(tmp_path / "one.jsonl")) if "loss" in r]
    two = [r for r in map(json.loads, open(tmp_path / "two.jsonl")) if "loss" in r]
    assert one[0]["loss"] == pytest.approx(0.6931472, abs=1e-6) and one[-1]["dpo_rewards_margin"] > 0
    for a, b in zip(one[3:], two, strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-6 and a["iteration"] == b["iteration"]


def test_bad_pairs_name_the_line(tmp_path, models, capsys):
    tok = HuggingFaceTokenizer(str(models[1]["policy"]))
    assert split_pair({"chosen": "The sky is blue.", "rejected": "The sky is red."}, "x") == \
        ("The sky is", " blue.", " red.")  # the shared beginning is the prompt
    implicit = {"chosen": CONVERSATIONAL[0]["prompt"] + CONVERSATIONAL[0]["chosen"],
                "rejected": CONVERSATIONAL[0]["prompt"] + CONVERSATIONAL[0]["rejected"]}
    assert split_pair(implicit, "x") == tuple(CONVERSATIONAL[0][k] for k in ("prompt", "chosen", "rejected"))
    for example, message in (({"prompt": "a", "chosen": "b"}, "needs 'chosen' and 'rejected'"),
                             ({"prompt": "a", "chosen": 1, "rejected": "c"}, "'chosen' must be text"),
                             ({"prompt": "a", "chosen": [{"role": "assistant", "content": "b"}], "rejected": "c"},
                              "a text prompt needs text completions")):
        with pytest.raises(DatasetError, match=f"f.jsonl:3: .*{message}"):
            split_pair(example, "f.jsonl:3")
    with pytest.raises(DatasetError, match="conversations need a chat template"):
        tokenize_pair(*split_pair(CONVERSATIONAL[0], "x"), tok, None, "x")
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps(TEXT[0]) + "\n" + json.dumps({**TEXT[1], "chosen": " blue" * 200}) + "\n")
    root, _ = models
    assert main(["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "64",
                 "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model",
                 str(root / "policy-megalm" / "tokenizer"), "--dpo-data", str(data)]) == 2
    err = capsys.readouterr().err
    assert f"{data}:2: the pair takes" in err and "more than --seq-length + 1 = 65" in err
