"""LoRA against PEFT and on its own terms: megalm's adapted forward equals PEFT's ``LoraModel`` on the same
adapter weights; an adapter checkpoint exported as PEFT's loads in PEFT onto the transformers base and gives
megalm's logits, and merged it gives the adapter model's; only the adapters get gradient buffers and Adam state
(12 bytes each in bf16); checkpoints hold the adapters alone and resume under another layout; expert adapters
merge exactly; target names that match nothing are refused by name."""
import json
import os

import pytest
import torch

from chat_data import tiny_tokenizer
from conftest import require, torchrun
from megalm.config import ConfigError, PostTrainConfig
from megalm.interop.hf import export_hf, import_hf
from megalm.model.gpt import GPT
from megalm.model.lora import adapters_disabled, apply_lora, freeze_base, merge_adapters
from megalm.parallel.state import Topology
from megalm.pretrain import main
from megalm.training.checkpoint import read_checkpoint
from parity import assert_close, parity_model_config

HF_NAMES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(transformers, vocab: int):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(config).eval()


def lora_config(rank=4, alpha=8.0, targets=HF_NAMES) -> PostTrainConfig:
    p = PostTrainConfig()
    p.lora_rank, p.lora_alpha, p.lora_target_modules = rank, alpha, list(targets)
    return p


def adapted(cfg, vocab, posttrain, *states):
    """A one-process GPT with adapters, loaded from whole-tensor ``states`` (the base, then the adapters)."""
    topo = Topology()
    model = GPT(cfg, vocab, topo)
    apply_lora(model, posttrain, topo)
    model.init_weights(0)
    for state in states:
        _copy(model, state)
    freeze_base(model)
    return model.eval()


@torch.no_grad()
def _copy(model, state):
    """Whole-tensor ``state`` into a one-process model (the parameters it names)."""
    for name, p in model.named_parameters():
        if name in state:
            p[: len(state[name])].copy_(state[name])  # a vocabulary's padding rows stay zero


def test_forward_equals_peft():
    transformers, peft = require("transformers"), require("peft")
    from megalm.interop.hf import from_hf, model_config_from_hf
    from megalm.config.model import fill_model_defaults

    hf = tiny_llama(transformers, 96)
    cfg = model_config_from_hf(hf.config.to_dict())
    fill_model_defaults(cfg)
    base = from_hf(cfg, {k: v.clone() for k, v in hf.state_dict().items()})
    theirs = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=HF_NAMES, lora_dropout=0.0))
    g = torch.Generator().manual_seed(1)
    mine = {}
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
                layer = name.split(".layers.")[1].split(".")[0]
                module = {"q_proj": "attention.wq", "k_proj": "attention.wk", "v_proj": "attention.wv",
                          "o_proj": "attention.wo", "gate_proj": "mlp.w1", "up_proj": "mlp.w3",
                          "down_proj": "mlp.w2"}[name.split(".lora_")[0].rsplit(".", 1)[-1]]
                mine[f"layers.{layer}.{module}.lora.{'a' if 'lora_A' in name else 'b'}"] = p.detach().clone()
    model = adapted(cfg, 96, lora_config(), base, mine)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(mine)
    tokens = torch.randint(0, 96, (2, 24), generator=g)
    with torch.no_grad():
        ours, reference = model(tokens), theirs(tokens).logits
        with adapters_disabled(model):
            plain = model(tokens)
    assert_close(ours, reference, 1e-5, "logits with adapters")
    assert (ours - plain).abs().max() > 1e-2  # the adapters change the output


def test_peft_and_merged_exports(tmp_path):
    """Import a transformers Llama, train adapters with its chat template, export them as PEFT's and merged."""
    transformers, peft = require("transformers"), require("peft")
    hf_dir = tmp_path / "hf"
    tiny_tokenizer(hf_dir, "llama3_1")
    vocab = transformers.AutoTokenizer.from_pretrained(hf_dir).vocab_size + 7  # room for the added tokens
    tiny_llama(transformers, vocab).save_pretrained(hf_dir)
    import_hf(str(hf_dir), str(tmp_path / "base"))
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"say {w}"},
                                                     {"role": "assistant", "content": f"{w} {w}"}]}) + "\n"
                            for w in ("red", "blue", "green", "good", "bad", "sun", "moon", "sky") * 2))
    tok_dir = tmp_path / "base" / "tokenizer"
    assert main(["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--num-query-groups", "2",
                 "--ffn-hidden-size", "64", "--position-embedding-type", "rope", "--normalization", "RMSNorm",
                 "--swiglu", "--untie-embeddings-and-output-weights", "--disable-bias-linear", "--norm-epsilon",
                 "1e-6", "--seq-length", "128", "--max-position-embeddings", "128", "--micro-batch-size", "2",
                 "--global-batch-size", "4", "--train-iters", "6", "--lr", "2e-2", "--split", "100,0,0",
                 "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(tok_dir), "--sft-data",
                 str(data), "--pretrained-checkpoint", str(tmp_path / "base"), "--lora-rank", "4", "--lora-alpha",
                 "8", "--lora-target-modules", "linear_qkv", "linear_proj", "linear_fc1", "linear_fc2", "--save",
                 str(tmp_path / "adapters"), "--eval-iters", "0"]) == 0
    adapters = read_checkpoint(str(tmp_path / "adapters"), parts=("model",))
    assert set(adapters["model"]) == {f"layers.{i}.{m}.lora.{ab}" for i in range(2) for ab in "ab" for m in (
        "attention.wq", "attention.wk", "attention.wv", "attention.wo", "mlp.w1", "mlp.w3", "mlp.w2")}
    base = read_checkpoint(str(tmp_path / "base"), parts=("model",))
    model = adapted(base["config"].model, base["meta"]["vocab_size"], lora_config(), base["model"],
                    adapters["model"])
    tokens = torch.tensor([[1, 5, 9, 33, 70, 12, 8, 100, 3, 64, 2, 11]])
    with torch.no_grad():
        ours = model(tokens)
    export_hf(str(tmp_path / "adapters"), str(tmp_path / "peft"), lora_format="peft")
    loaded = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(hf_dir),
                                            str(tmp_path / "peft")).eval()
    with torch.no_grad():
        theirs = loaded(tokens).logits[..., : ours.shape[-1]]
    assert_close(theirs, ours, 1e-4, "PEFT adapter model against megalm's")
    export_hf(str(tmp_path / "adapters"), str(tmp_path / "merged"), merge_lora=True)
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert_close(merged(tokens).logits[..., : ours.shape[-1]], theirs, 1e-4, "merged export against PEFT's")
    from megalm.generate import load_for_inference

    generator, _ = load_for_inference(str(tmp_path / "adapters"), Topology(), {})  # megalm-generate's loading
    with torch.no_grad():
        assert_close(generator(tokens), ours, 1e-5, "megalm-generate on the adapter checkpoint (merged)")
    config = json.load(open(tmp_path / "merged" / "tokenizer_config.json"))
    assert "Cutting Knowledge Date" in config["chat_template"]  # the chat template travels with the model
    with pytest.raises(Exception, match="holds LoRA adapters only: add --merge-lora"):
        export_hf(str(tmp_path / "adapters"), str(tmp_path / "x"))


def test_only_adapters_get_gradients_and_adam_state(tmp_path, bpe_flags):
    """bf16: Adam's two moments and the fp32 main copy, 12 bytes per adapter parameter, and gradient buffers only
    for them (4 bytes each: fp32); the frozen base gets neither."""
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q {i}", "response": f" a {i}"}) + "\n" for i in range(40)))
    argv = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "32",
            "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "2", "--bf16", "--lora-rank", "8",
            "--sft-data", str(data), "--metrics-file", str(tmp_path / "m.jsonl"), "--save", str(tmp_path / "ck"),
            "--eval-iters", "0", *bpe_flags]
    assert main(argv) == 0
    row = next(r for r in map(json.loads, open(tmp_path / "m.jsonl")) if r.get("iteration") == 1)
    saved = read_checkpoint(str(tmp_path / "ck"), parts=("model",))
    adapters = sum(p.numel() for p in saved["model"].values())
    assert adapters == 2 * (8 * (32 + 32) * 4 + 8 * (32 + 128) * 2)  # q k v o and the MLP's two, per layer
    assert row["optimizer_state_bytes"] + row["main_param_bytes"] == 12 * adapters
    assert row["grad_bytes"] == 4 * adapters and row["param_bytes"] == 2 * adapters
    base = sum(p.numel() for p in GPT(saved["config"].model, saved["meta"]["vocab_size"]).parameters())
    assert row["frozen_param_bytes"] == 2 * base  # the base in bf16, outside the optimizer


def test_adapter_checkpoint_resumes_under_another_layout(tmp_path, bpe_flags, capsys):
    """Adapters saved by one process resume under TP 2 on the base they record, continuing as the one-process
    run does."""
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"question {i}:", "response": f" answer {i % 7}"}) + "\n"
                            for i in range(60)))
    base = tmp_path / "base"
    common = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "32",
              "--micro-batch-size", "2", "--global-batch-size", "4", "--sft-data", str(data), "--eval-iters", "0",
              "--log-interval", "1", *bpe_flags]
    assert main(common + ["--train-iters", "1", "--save", str(base)]) == 0
    lora = common + ["--lora-rank", "4", "--lora-target-modules", "q_proj", "v_proj", "down_proj", "--train-iters",
                     "6", "--lr", "1e-2"]
    assert main(lora + ["--pretrained-checkpoint", str(base), "--metrics-file", str(tmp_path / "one.jsonl")]) == 0
    assert main(lora + ["--pretrained-checkpoint", str(base), "--exit-interval", "3", "--save",
                        str(tmp_path / "ck")]) == 0
    res = torchrun(2, "megalm/pretrain.py", *lora, "--tensor-model-parallel-size", "2", "--load", tmp_path / "ck",
                   "--metrics-file", tmp_path / "two.jsonl")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert f"the base of {tmp_path / 'ck'} is {base}" in res.stdout
    one = [r for r in map(json.loads, open(tmp_path / "one.jsonl")) if "loss" in r]
    two = [r for r in map(json.loads, open(tmp_path / "two.jsonl")) if "loss" in r]
    assert [r["iteration"] for r in two] == [4, 5, 6]
    for a, b in zip(one[3:], two, strict=True):
        assert abs(a["loss"] - b["loss"]) / a["loss"] < 1e-5
    capsys.readouterr()
    assert main(common + ["--train-iters", "6", "--load", str(tmp_path / "ck")]) == 2  # without --lora-rank
    assert "holds LoRA adapters only (rank 4 on q_proj v_proj down_proj): resume it with the same --lora-rank" in \
        capsys.readouterr().err
    # a whole model given to --load of a LoRA run: refused, or with --finetune the base, as --pretrained-checkpoint
    assert main(lora + ["--load", str(base)]) == 2
    assert "holds a whole model, not LoRA adapters: give it as --pretrained-checkpoint" in capsys.readouterr().err
    assert main(lora + ["--load", str(base), "--finetune", "--metrics-file", str(tmp_path / "ft.jsonl")]) == 0
    finetuned = [r for r in map(json.loads, open(tmp_path / "ft.jsonl")) if "loss" in r]
    for a, b in zip(one, finetuned, strict=True):
        assert abs(a["loss"] - b["loss"]) / a["loss"] < 1e-6


def test_expert_adapters_merge_exactly():
    """Adapters on the experts' stacks (and the shared expert) give what their merged weights give."""
    cfg = parity_model_config(position_embedding_type="rope", normalization="RMSNorm", swiglu=True,
                              untie_embeddings_and_output_weights=True, add_bias_linear=False, num_experts=4,
                              moe_router_topk=2, moe_shared_expert_intermediate_size=32)
    model = adapted(cfg, 300, lora_config(targets=["linear_fc1", "linear_fc2"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".lora.b") or ".lora.w" in name and name.endswith(".b"):
                p.normal_(0, 0.2)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("experts.lora.w3" in n for n in names) and any("shared.w2.lora" in n for n in names)
    state = {n: p.detach().clone() for n, p in model.named_parameters()}
    merged = GPT(cfg, 300, Topology())
    merged.init_weights(0)
    _copy(merged, merge_adapters(state, 8.0, 4))
    tokens = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert_close(model.eval()(tokens), merged.eval()(tokens), 1e-5, "experts' adapters against merged")


def test_target_names_that_match_nothing(tmp_path, bpe_flags, capsys):
    with pytest.raises(ConfigError, match="--lora-target-modules q_a_proj: this model has no such projection"):
        apply_lora(GPT(parity_model_config(), 300), lora_config(targets=["q_proj", "q_a_proj"]), Topology())
    data = tmp_path / "sft.jsonl"
    data.write_text('{"prompt": "a", "response": "b"}\n' * 4)
    assert main(["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "32",
                 "--sft-data", str(data), "--lora-rank", "4", "--lora-target-modules", "kv_b_proj", *bpe_flags]) == 2
    assert "--lora-target-modules kv_b_proj: this model has no such projection" in capsys.readouterr().err
