"""Hugging Face interop: export from a TP 2 x PP 2 checkpoint loads in transformers with megalm's logits and greedy
tokens; import -> export is the identity; an imported model's loss equals transformers'."""
import itertools

import pytest
import torch

from conftest import require, tiny_train_flags, torchrun
from megalm.generate import generate, load_for_inference
from megalm.parallel.state import Topology
from megalm.interop.hf import export_main, import_main

transformers = require("transformers")
from safetensors.torch import load_file  # noqa: E402

FLAVOURS = {
    "gpt2": [],
    "llama": ["--position-embedding-type", "rope", "--normalization", "RMSNorm", "--swiglu",
              "--untie-embeddings-and-output-weights", "--num-query-groups", "2", "--disable-bias-linear"],
}


@pytest.fixture(scope="module", params=list(FLAVOURS))
def exported(request, tmp_path_factory, dataset_prefix, bpe_flags):
    d = tmp_path_factory.mktemp(f"hf-{request.param}")
    flags = tiny_train_flags(dataset_prefix, bpe_flags, "--train-iters", "4", "--lr", "3e-3", *FLAVOURS[request.param],
                             "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2")
    res = torchrun(4, "megalm/pretrain.py", *flags, "--save", d / "ck")
    assert res.returncode == 0, res.stderr[-3000:]
    assert export_main(["--load", str(d / "ck"), "--output", str(d / "hf")]) == 0
    return request.param, d


def test_transformers_loads_export_with_same_logits_and_tokens(exported):
    name, d = exported
    hf = transformers.AutoModelForCausalLM.from_pretrained(d / "hf", local_files_only=True).eval()
    assert type(hf).__name__ == {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}[name]
    model, tok = load_for_inference(str(d / "ck"), Topology(), {})
    ids = torch.tensor([tok.tokenize("Return a new list of the items in the sequence")[:24]])
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() < 1e-4
    greedy = generate(model, ids[0].tolist(), 10, stop_ids=())
    with torch.no_grad():
        hf_greedy = hf.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=None,
                                pad_token_id=tok.eod)[0].tolist()
    assert greedy == hf_greedy
    hf_tok = transformers.AutoTokenizer.from_pretrained(d / "hf", local_files_only=True)
    text = "Return a new list"
    assert hf_tok(text)["input_ids"] == tok.tokenize(text)


def test_import_export_round_trip_and_loss(exported, tmp_path):
    name, d = exported
    assert import_main(["--input", str(d / "hf"), "--save", str(tmp_path / "imported")]) == 0
    assert export_main(["--load", str(tmp_path / "imported"), "--output", str(tmp_path / "again")]) == 0
    first, second = load_file(d / "hf" / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    model, tok = load_for_inference(str(tmp_path / "imported"), Topology(), {})
    hf = transformers.AutoModelForCausalLM.from_pretrained(d / "hf", local_files_only=True).eval()
    ids = torch.tensor([tok.tokenize("The file object is closed when the block ends")[:20]])
    with torch.no_grad():
        ours = model(ids[:, :-1], ids[:, 1:]).mean()
        theirs = hf(ids, labels=ids).loss
    assert abs(ours.item() - theirs.item()) < 1e-5


def _save_hf(model, folder, bpe_dir):
    import shutil

    model.save_pretrained(folder)
    for f in ("vocab.json", "merges.txt"):
        shutil.copy(f"{bpe_dir}/{f}", folder / f)


def _logits_match(folder, save, ids):
    assert import_main(["--input", str(folder), "--save", str(save)]) == 0
    model, _ = load_for_inference(str(save), Topology(), {})
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    with torch.no_grad():
        return (model(ids) - hf(ids).logits).abs().max().item()


def _imported(theirs, tmp_path, bpe_dir):
    """``theirs`` saved under ``tmp_path/in`` and imported into ``tmp_path/ck``, its logits on 24 random tokens
    within 1e-4 of transformers'; returns (the imported model, those tokens)."""
    _save_hf(theirs, tmp_path / "in", bpe_dir)
    ids = torch.randint(0, 1024, (1, 24))
    assert _logits_match(tmp_path / "in", tmp_path / "ck", ids) < 1e-4
    return load_for_inference(str(tmp_path / "ck"), Topology(), {})[0], ids


def _same_greedy_tokens(model, theirs, ids, new=8):
    """megalm's KV-cached greedy continuation of ``ids`` equals transformers'."""
    with torch.no_grad():
        hf_greedy = theirs.generate(ids, max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)[0]
    assert generate(model, ids[0].tolist(), new, stop_ids=()) == hf_greedy.tolist()


def _exports_back(tmp_path, theirs, ids) -> dict:
    """megalm-export-hf of ``tmp_path/ck`` writes exactly the tensors of ``tmp_path/in``, and transformers loads the
    export with ``theirs``'s logits; returns the exported config.json."""
    import json

    assert export_main(["--load", str(tmp_path / "ck"), "--output", str(tmp_path / "out")]) == 0
    first, second = load_file(tmp_path / "in" / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", local_files_only=True).eval()
    with torch.no_grad():
        assert torch.allclose(again(ids).logits, theirs(ids).logits, atol=1e-5)
    return json.loads((tmp_path / "out" / "config.json").read_text())


def test_import_transformers_initialised_models(tmp_path, bpe_dir):
    """Models transformers itself initialised, with their default configs: GPT-2's gelu_new (the tanh GELU, which
    megalm once only warned about: logits differed), and a Llama whose RoPE base sits under transformers 5's
    rope_parameters (once read from rope_theta only)."""
    torch.manual_seed(0)
    ids = torch.randint(0, 1024, (1, 24))
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=64,
                                                                vocab_size=1024))
    assert gpt2.config.activation_function == "gelu_new"
    _save_hf(gpt2, tmp_path / "gpt2", bpe_dir)
    assert _logits_match(tmp_path / "gpt2", tmp_path / "gpt2-ck", ids) < 1e-4
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=1024, max_position_embeddings=64, rope_parameters={"rope_type": "default", "rope_theta": 500.0}))
    _save_hf(llama, tmp_path / "llama", bpe_dir)
    assert "rope_parameters" in (tmp_path / "llama" / "config.json").read_text()
    assert _logits_match(tmp_path / "llama", tmp_path / "llama-ck", ids) < 1e-4


def test_mixtral_both_ways(tmp_path, bpe_dir, dataset_prefix, bpe_flags):
    """A transformers-initialised MixtralForCausalLM imports with its logits (within 1e-4) and exports back
    unchanged; a megalm MoE model trained at EP 2 exports to a Mixtral that transformers loads with megalm's
    logits and greedy tokens."""
    torch.manual_seed(0)
    ids = torch.randint(0, 1024, (1, 24))
    mixtral = transformers.MixtralForCausalLM(transformers.MixtralConfig(
        num_hidden_layers=2, hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=1024, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64))
    _save_hf(mixtral, tmp_path / "mixtral", bpe_dir)
    assert _logits_match(tmp_path / "mixtral", tmp_path / "mixtral-ck", ids) < 1e-4
    assert export_main(["--load", str(tmp_path / "mixtral-ck"), "--output", str(tmp_path / "again")]) == 0
    first, second = load_file(tmp_path / "mixtral" / "model.safetensors"), load_file(tmp_path / "again" /
                                                                                     "model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)

    flags = tiny_train_flags(dataset_prefix, bpe_flags, "--train-iters", "4", "--lr", "3e-3", *FLAVOURS["llama"],
                             "--num-experts", "4", "--moe-ffn-hidden-size", "48", "--moe-aux-loss-coeff", "0.01",
                             "--expert-model-parallel-size", "2")
    res = torchrun(2, "megalm/pretrain.py", *flags, "--save", tmp_path / "ck")
    assert res.returncode == 0, res.stderr[-3000:]
    assert export_main(["--load", str(tmp_path / "ck"), "--output", str(tmp_path / "hf")]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True).eval()
    assert type(hf).__name__ == "MixtralForCausalLM"
    model, tok = load_for_inference(str(tmp_path / "ck"), Topology(), {})
    ids = torch.tensor([tok.tokenize("Return a new list of the items in the sequence")[:24]])
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max().item() < 1e-4
        hf_greedy = hf.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None,
                                pad_token_id=tok.eod)[0].tolist()
    assert generate(model, ids[0].tolist(), 8, stop_ids=()) == hf_greedy


LLAMA31_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 16}  # every band of it in use
FAMILIES = {
    # family: (transformers class, its config with the keys real checkpoints carry, megalm options it should give)
    "llama3.1": ("LlamaForCausalLM", "LlamaConfig", dict(rope_parameters=LLAMA31_ROPE),
                 dict(use_rope_scaling=True, rope_scaling_original_max_position_embeddings=16, rotary_base=500000.0)),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", dict(use_sliding_window=False, sliding_window=8,
                                                     max_window_layers=1, tie_word_embeddings=True),
              dict(add_qkv_bias=True, add_bias_linear=False, sliding_window=None)),
    "qwen2-window": ("Qwen2ForCausalLM", "Qwen2Config", dict(use_sliding_window=True, sliding_window=8,
                                                            max_window_layers=0),
                     dict(add_qkv_bias=True, sliding_window=8)),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", dict(head_dim=16, tie_word_embeddings=True),
              dict(qk_layernorm=True, kv_channels=16, add_bias_linear=False)),
    "mistral": ("MistralForCausalLM", "MistralConfig", dict(sliding_window=8, head_dim=8),
                dict(sliding_window=8, add_bias_linear=False)),
    # YaRN as Qwen2.5's long-context configs and DeepSeek-V3 / GPT-OSS set it: interpolated, ramped and kept
    # frequencies over a 16-token original context, the attention-scale correction from mscale / mscale_all_dim
    "qwen2-yarn": ("Qwen2ForCausalLM", "Qwen2Config", dict(head_dim=16, rope_parameters=dict(
        rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=16)),
        dict(rope_type="yarn", rotary_scaling_factor=4.0, original_max_position_embeddings=16)),
    "llama-yarn-mscale-untruncated": ("LlamaForCausalLM", "LlamaConfig", dict(head_dim=16, rope_parameters=dict(
        rope_type="yarn", rope_theta=10000.0, factor=8.0, original_max_position_embeddings=16, beta_fast=8.0,
        beta_slow=1.0, mscale=0.9, mscale_all_dim=0.5, truncate=False)),
        dict(rope_type="yarn", mscale=0.9, mscale_all_dim=0.5, yarn_correction_range_round_to_int=False)),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_families_both_ways(tmp_path, bpe_dir, family):
    """A tiny transformers model of each family people fine-tune now (its weights, biases included, perturbed off
    their initial values): import gives its logits within 1e-4 and the model options that make it that family;
    greedy tokens equal transformers' (24-token prompt, 8 new: past the 8-position windows); export gives back
    the same weights and a config transformers loads with the same logits."""
    cls, config_cls, keys, options = FAMILIES[family]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                                               num_attention_heads=4, num_key_value_heads=2, vocab_size=1024,
                                               max_position_embeddings=64, **keys)
    theirs = getattr(transformers, cls)(config).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    _save_hf(theirs, tmp_path / "in", bpe_dir)
    ids = torch.randint(0, 1024, (1, 24))
    assert _logits_match(tmp_path / "in", tmp_path / "ck", ids) < 1e-4
    model, _ = load_for_inference(str(tmp_path / "ck"), Topology(), {})
    assert {k: getattr(model.cfg, k) for k in options} == options
    _same_greedy_tokens(model, theirs, ids)
    assert _exports_back(tmp_path, theirs, ids)["architectures"] == [cls]


def test_a_window_on_some_layers_only(tmp_path, bpe_dir, capsys):
    """Qwen2 with its window on the second layer only (max_window_layers 1): imports as --sliding-window 8
    --window-attn-skip-freq '[0,1]' with transformers' logits and greedy tokens past the window, and exports the same
    layer_types back; a layer type megalm does not implement is refused by name."""
    import json

    torch.manual_seed(0)
    qwen = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=1024, use_sliding_window=True, sliding_window=8, max_window_layers=1,
        max_position_embeddings=64)).eval()
    _save_hf(qwen, tmp_path / "in", bpe_dir)
    ids = torch.randint(0, 1024, (1, 24))
    assert _logits_match(tmp_path / "in", tmp_path / "ck", ids) < 1e-4
    model, _ = load_for_inference(str(tmp_path / "ck"), Topology(), {})
    assert (model.cfg.sliding_window, model.cfg.window_layers()) == (8, [False, True])
    _same_greedy_tokens(model, qwen, ids)
    assert _exports_back(tmp_path, qwen, ids)["layer_types"] == ["full_attention", "sliding_attention"]

    config = json.loads((tmp_path / "in" / "config.json").read_text())
    config["layer_types"] = ["chunked_attention", "full_attention"]
    (tmp_path / "in" / "config.json").write_text(json.dumps(config))
    assert import_main(["--input", str(tmp_path / "in"), "--save", str(tmp_path / "out2")]) == 2
    err = capsys.readouterr().err
    assert "layer_types=['chunked_attention', 'full_attention']" in err, err
    assert not (tmp_path / "out2").exists()


@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_qwen3_moe_both_ways(tmp_path, bpe_dir, norm_topk_prob):
    """A transformers-initialised Qwen3MoeForCausalLM (QK norms, a head width of its own, a dense layer among MoE
    ones, either router normalisation) imports with its logits within 1e-4 and exports back unchanged."""
    torch.manual_seed(0)
    ids = torch.randint(0, 1024, (1, 24))
    qwen = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
        num_hidden_layers=3, hidden_size=32, intermediate_size=64, moe_intermediate_size=24, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, vocab_size=1024, num_experts=4, num_experts_per_tok=2,
        norm_topk_prob=norm_topk_prob, mlp_only_layers=[1], max_position_embeddings=64))
    _save_hf(qwen, tmp_path / "qwen", bpe_dir)
    assert _logits_match(tmp_path / "qwen", tmp_path / "qwen-ck", ids) < 1e-4
    model, _ = load_for_inference(str(tmp_path / "qwen-ck"), Topology(), {})
    assert model.cfg.kv_channels == 16 and model.cfg.moe_layers() == [True, False, True]
    assert export_main(["--load", str(tmp_path / "qwen-ck"), "--output", str(tmp_path / "again")]) == 0
    first, second = load_file(tmp_path / "qwen" / "model.safetensors"), load_file(tmp_path / "again" /
                                                                                  "model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "again", local_files_only=True).eval()
    with torch.no_grad():
        assert torch.allclose(again(ids).logits, qwen.eval()(ids).logits, atol=1e-5)


@pytest.mark.parametrize("change, named", [
    ({"rope_parameters": {"rope_type": "dynamic", "rope_theta": 500000.0, "factor": 8.0}},
     "rope_parameters.rope_type='dynamic'"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 500000.0, "factor": 8.0}},
     "rope_parameters with rope_type 'yarn' lacks original_max_position_embeddings"),
    ({"rope_parameters": dict(LLAMA31_ROPE, beta_fast=32)}, "rope_parameters holds beta_fast"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling.rope_type='linear'"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"mlp_bias": True}, "mlp_bias=True"),
    ({"sliding_window": 16}, "sliding_window=16"),
], ids=["dynamic-rope", "yarn-without-original-length", "llama3-unknown-setting", "linear-rope", "act", "mlp-bias",
        "unknown-key"])
def test_import_refuses_what_it_does_not_implement(tmp_path, bpe_dir, change, named, capsys):
    import json

    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=4, vocab_size=1024))
    _save_hf(llama, tmp_path / "in", bpe_dir)
    cfg = json.loads((tmp_path / "in" / "config.json").read_text())
    cfg.update(change)
    (tmp_path / "in" / "config.json").write_text(json.dumps(cfg))
    assert import_main(["--input", str(tmp_path / "in"), "--save", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert named in err, err
    assert not (tmp_path / "out" / "latest_checkpointed_iteration.txt").exists()


GLM = dict(num_hidden_layers=3, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_attention_heads=4,
           num_key_value_heads=2, head_dim=16, vocab_size=1024, n_routed_experts=8, n_shared_experts=2,
           num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1, routed_scaling_factor=2.5,
           partial_rotary_factor=0.5, use_qk_norm=True, attention_bias=True, max_position_embeddings=64)


DEEPSEEK = dict(num_hidden_layers=3, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                num_attention_heads=4, num_key_value_heads=4, vocab_size=1024, n_routed_experts=8, n_shared_experts=2,
                num_experts_per_tok=4, n_group=4, topk_group=2, first_k_dense_replace=1, routed_scaling_factor=2.5,
                kv_lora_rank=16, q_lora_rank=24, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12,
                max_position_embeddings=64, rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                                                 original_max_position_embeddings=16, beta_fast=32.0,
                                                                 beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0))


def _glm(**change):
    torch.manual_seed(0)
    glm = transformers.Glm4MoeForCausalLM(transformers.Glm4MoeConfig(**dict(GLM, **change))).eval()
    with torch.no_grad():  # off the initial values, the expert bias too (a buffer transformers never trains)
        for p in glm.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        for layer in glm.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.copy_(torch.randn(8) * 0.1)
    return glm


@pytest.mark.parametrize("qk_norm", [True, False], ids=["glm4.5", "glm4.5-air"])
def test_glm4_moe_both_ways(tmp_path, bpe_dir, qk_norm):
    """A tiny Glm4MoeForCausalLM (partial RoPE, q/k/v biases, QK norms or none, sigmoid group-limited routing with
    the expert bias and a routed scaling factor, a shared expert, the first layer dense): import gives its logits
    within 1e-4 and its greedy tokens, export gives back the same weights and a model with the same logits."""
    glm = _glm(use_qk_norm=qk_norm)
    model, ids = _imported(glm, tmp_path, bpe_dir)
    m = model.cfg
    assert (m.rotary_percent, m.rotary_dim, m.add_qkv_bias, m.add_bias_linear, m.qk_layernorm) == \
        (0.5, 8, True, False, qk_norm)
    assert (m.moe_router_score_function, m.moe_router_num_groups, m.moe_router_group_topk,
            m.moe_router_topk_scaling_factor, m.moe_shared_expert_intermediate_size, m.moe_layers()) == \
        ("sigmoid", 2, 1, 2.5, 32, [False, True, True])
    _same_greedy_tokens(model, glm, ids)
    assert _exports_back(tmp_path, glm, ids)["architectures"] == ["Glm4MoeForCausalLM"]


def test_deepseek_router_picks_transformers_experts_and_weights():
    """megalm's router (sigmoid scores, the expert bias for the choice only, group-limited top-k, normalised
    weights times the scaling factor) against transformers' DeepSeek-V3 and GLM-4.5 routers on the same weights and
    tokens: the same experts and the same weights for every token, not just the same loss."""
    from megalm.config import Config, ModelConfig, finalize
    from megalm.model.moe import Router

    routers = ((transformers.Glm4MoeConfig, GLM, transformers.models.glm4_moe.modeling_glm4_moe.Glm4MoeTopkRouter),
               (transformers.DeepseekV3Config, DEEPSEEK,
                transformers.models.deepseek_v3.modeling_deepseek_v3.DeepseekV3TopkRouter))
    for (config_class, shape, router_class), layout in itertools.product(routers, (
            dict(n_group=2, topk_group=1, num_experts_per_tok=2), dict(n_group=4, topk_group=2, num_experts_per_tok=4))):
        torch.manual_seed(0)
        theirs = router_class(config_class(**dict(shape, **layout)))
        with torch.no_grad():
            theirs.weight.normal_()
            theirs.e_score_correction_bias.normal_(std=0.3)
        cfg = Config()
        cfg.data.tokenizer_type, cfg.data.vocab_size = "NullTokenizer", 100
        cfg.model = ModelConfig(num_layers=3, hidden_size=32, num_experts=8,
                                moe_router_topk=layout["num_experts_per_tok"],
                                moe_router_score_function="sigmoid", moe_router_num_groups=layout["n_group"],
                                moe_router_group_topk=layout["topk_group"], moe_router_enable_expert_bias=True,
                                moe_router_topk_scaling_factor=2.5)
        router = Router(finalize(cfg).model, Topology())
        with torch.no_grad():
            router.weight.copy_(theirs.weight)
            router.expert_bias.copy_(theirs.e_score_correction_bias)
        x = torch.randn(64, 32)
        _, their_weights, their_experts = theirs(x)
        experts, probs, *_ = router(x, 1)
        ours = {(t, e): w for t in range(64) for e, w in zip(experts[t].tolist(), probs[t].tolist())}
        hf = {(t, e): w for t in range(64) for e, w in zip(their_experts[t].tolist(), their_weights[t].tolist())}
        assert ours.keys() == hf.keys(), layout
        assert max(abs(ours[k] - hf[k]) for k in ours) < 1e-6, layout


GPT_OSS = dict(num_hidden_layers=2, hidden_size=32, intermediate_size=16, num_attention_heads=4, num_key_value_heads=2,
               head_dim=8, vocab_size=1024, num_local_experts=4, num_experts_per_tok=2, sliding_window=8,
               max_position_embeddings=64, rope_parameters=dict(rope_type="yarn", rope_theta=150000.0, factor=4.0,
                                                                beta_fast=32.0, beta_slow=1.0, truncate=False,
                                                                original_max_position_embeddings=16))


def test_gpt_oss_both_ways(tmp_path, bpe_dir):
    """A tiny GptOssForCausalLM (sinks, biases everywhere, a window on every other layer, YaRN without rounding,
    the clamped SwiGLU, experts fused and interleaved in the files; weights, biases and sinks perturbed, the
    activations pushed past the clamp): import gives its logits within 1e-4 and its greedy tokens past the window,
    export gives back the same tensors and a model with the same logits."""
    torch.manual_seed(0)
    oss = transformers.GptOssForCausalLM(transformers.GptOssConfig(**GPT_OSS)).eval()
    with torch.no_grad():
        for name, p in oss.named_parameters():
            p.add_(torch.randn_like(p) * (3.0 if "experts" in name else 0.5 if "sinks" in name else 0.05))
    model, ids = _imported(oss, tmp_path, bpe_dir)
    m = model.cfg
    assert (m.softmax_type, m.quick_geglu, m.glu_linear_offset, m.activation_func_clamp_value, m.add_bias_linear,
            m.rope_type, m.yarn_correction_range_round_to_int, m.window_layers()) == \
        ("learnable", True, 1.0, 7.0, True, "yarn", False, [True, False])
    _same_greedy_tokens(model, oss, ids)
    assert _exports_back(tmp_path, oss, ids)["layer_types"] == ["sliding_attention", "full_attention"]


@pytest.mark.parametrize("q_lora_rank", [24, None], ids=["deepseek-v3", "no-query-latent"])
def test_deepseek_v3_both_ways(tmp_path, bpe_dir, q_lora_rank):
    """A tiny DeepseekV3ForCausalLM (multi-latent attention with interleaved RoPE rows, YaRN with mscale_all_dim,
    sigmoid group-limited routing with the expert bias, shared experts, the first layer dense; weights perturbed):
    import gives its logits within 1e-4 and its greedy tokens (megalm decoding from the cached latent), export gives
    back the same tensors and a model with the same logits. Then megalm adds a multi-token prediction module: its
    export holds DeepSeek's extra layer (which transformers skips, logits unchanged) and imports back unchanged."""
    import dataclasses
    import json

    from megalm.model.gpt import GPT
    from megalm.training.checkpoint import load_model_state, read_checkpoint, save_checkpoint

    torch.manual_seed(0)
    ds = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**dict(DEEPSEEK, q_lora_rank=q_lora_rank)))
    ds.eval()
    with torch.no_grad():
        for p in ds.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        for layer in ds.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.copy_(torch.randn(8) * 0.1)
    model, ids = _imported(ds, tmp_path, bpe_dir)
    m = model.cfg
    assert (m.multi_latent_attention, m.q_lora_rank, m.kv_lora_rank, m.qk_head_dim, m.qk_pos_emb_head_dim,
            m.v_head_dim, m.rope_type, m.mscale_all_dim, m.mtp_num_layers, m.moe_layers()) == \
        (True, q_lora_rank, 16, 8, 8, 12, "yarn", 1.0, None, [False, True, True])  # the config's MTP layer: absent
    _same_greedy_tokens(model, ds, ids)
    assert _exports_back(tmp_path, ds, ids)["architectures"] == ["DeepseekV3ForCausalLM"]
    # a multi-token prediction module, trained by nobody: exported as layer 3, read back exactly
    saved = read_checkpoint(str(tmp_path / "ck"), parts=("model",))
    cfg = saved["config"]
    cfg.model = dataclasses.replace(cfg.model, mtp_num_layers=1)
    mtp = GPT(cfg.model, model.vocab_size)
    mtp.init_weights(5)
    load_model_state(mtp, {**{k: v for k, v in mtp.state_dict().items() if k.startswith("mtp.")}, **saved["model"]},
                     Topology(), "test")
    folder = tmp_path / "mtp"
    save_checkpoint(str(folder / "ck"), 0, mtp, {}, cfg, Topology(), {"consumed_samples": 0}, {})
    assert export_main(["--load", str(folder / "ck"), "--output", str(folder / "hf")]) == 0
    files = load_file(folder / "hf" / "model.safetensors")
    assert {"model.layers.3.eh_proj.weight", "model.layers.3.shared_head.head.weight",
            "model.layers.3.self_attn.kv_b_proj.weight", "model.layers.3.mlp.experts.7.up_proj.weight"} <= set(files)
    assert torch.equal(files["model.layers.3.embed_tokens.weight"], files["model.embed_tokens.weight"])
    assert json.loads((folder / "hf" / "config.json").read_text())["num_nextn_predict_layers"] == 1
    again = transformers.AutoModelForCausalLM.from_pretrained(folder / "hf", local_files_only=True).eval()
    with torch.no_grad():
        assert torch.allclose(again(ids).logits, ds(ids).logits, atol=1e-5)
    assert import_main(["--input", str(folder / "hf"), "--save", str(folder / "back")]) == 0
    back = read_checkpoint(str(folder / "back"), parts=("model",))["model"]
    ours = read_checkpoint(str(folder / "ck"), parts=("model",))["model"]
    assert back.keys() == ours.keys() and all(torch.equal(back[k], ours[k]) for k in back)
