"""megatron-core as a test peer (never imported by megalm): under ``torchrun --nproc_per_node TP``, build a GPTModel
on CPU (local spec), give every weight a perturbation off its initial value, write its logits on fixed tokens,
and save it the way Megatron-LM's ``save_checkpoint`` does: ``SAVE/iter_NNNNNNN/`` in ``torch_dist`` (the model's
sharded state dict plus ``args``, ``checkpoint_version`` and ``iteration``, through ``dist_checkpointing``) or in
the legacy per-rank ``mp_rank_XX/model_optim_rng.pt``, and ``SAVE/latest_checkpointed_iteration.txt``. With
``--load-dir`` it instead loads a ``torch_dist`` checkpoint (megalm's export) into the model and writes the logits.

The three CUDA-only calls megatron-core makes on this path get stand-ins (``../shared/docs/facts.md``).
"""
import argparse
import contextlib
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F


def stand_ins():
    from megatron.core import tensor_parallel, utils

    utils.GlobalMemoryBuffer.get_tensor = lambda self, shape, dtype, name, *a, **k: torch.empty(shape, dtype=dtype)
    tensor_parallel.get_cuda_rng_tracker().fork = lambda *a, **k: contextlib.nullcontext()
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.current_device = lambda: "cpu"


FLAVOURS = {
    "gpt2": dict(normalization="LayerNorm", swiglu=False, bias=True, groups=4, position="learned_absolute",
                 untie=False),
    "llama": dict(normalization="RMSNorm", swiglu=True, bias=False, groups=2, position="rope", untie=True),
    # GLM-4.5's partial RoPE as Megatron configures it: --rotary-percent 0.5
    "llama-rotary-half": dict(normalization="RMSNorm", swiglu=True, bias=False, groups=2, position="rope", untie=True,
                              rotary_percent=0.5),
}


def megatron_args(a, f, padded_vocab):
    """The ``args`` Megatron-LM saves: its flag names and types (an enum among them), as far as a GPT needs."""
    from megatron.core.transformer.enums import AttnBackend

    return argparse.Namespace(
        num_layers=a.layers, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
        group_query_attention=f["groups"] != 4, num_query_groups=f["groups"], kv_channels=8, seq_length=32,
        max_position_embeddings=64, position_embedding_type=f["position"], normalization=f["normalization"],
        norm_epsilon=1e-5, swiglu=f["swiglu"], untie_embeddings_and_output_weights=f["untie"],
        add_bias_linear=f["bias"], add_qkv_bias=f["bias"], rotary_base=10000,
        rotary_percent=f.get("rotary_percent", 1.0),
        rotary_interleaved=False, use_rope_scaling=False, openai_gelu=False, squared_relu=False, qk_layernorm=False,
        apply_residual_connection_post_layernorm=False, num_experts=None, multi_latent_attention=False,
        tensor_model_parallel_size=a.tp, pipeline_model_parallel_size=1, padded_vocab_size=padded_vocab,
        make_vocab_size_divisible_by=128, tokenizer_type="GPT2BPETokenizer", vocab_file=a.vocab_file,
        merge_file=a.merge_file, vocab_size=None, consumed_train_samples=a.consumed, consumed_valid_samples=0,
        iteration=a.iteration, global_batch_size=4, micro_batch_size=2, train_iters=100, seed=1234,
        data_path=[a.data_path], split="90,10,0", attention_backend=AttnBackend.auto, params_dtype=torch.float32,
        fp16=False, bf16=False, ckpt_format=a.format)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--flavour", choices=FLAVOURS, required=True)
    ap.add_argument("--format", choices=("torch_dist", "torch"), default="torch_dist")
    ap.add_argument("--save", help="Megatron-LM save directory to write")
    ap.add_argument("--load-dir", help="a torch_dist checkpoint directory to load instead")
    ap.add_argument("--logits", required=True, help="where rank 0 writes the logits on --tokens")
    ap.add_argument("--tokens", required=True, help="a .pt file with a [1, s] token tensor")
    ap.add_argument("--vocab-size", type=int, required=True, help="the tokenizer's vocabulary")
    ap.add_argument("--vocab-file", default=None)
    ap.add_argument("--merge-file", default=None)
    ap.add_argument("--data-path", default=None)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--iteration", type=int, default=10)
    ap.add_argument("--consumed", type=int, default=40)
    a = ap.parse_args()
    dist.init_process_group("gloo")
    a.tp = dist.get_world_size()
    stand_ins()
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    parallel_state.initialize_model_parallel(a.tp, 1)
    f = FLAVOURS[a.flavour]
    multiple = 128 * a.tp
    padded = (a.vocab_size + multiple - 1) // multiple * multiple
    config = TransformerConfig(
        num_layers=a.layers, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4, num_query_groups=f["groups"],
        use_cpu_initialization=True, normalization=f["normalization"], gated_linear_unit=f["swiglu"],
        activation_func=F.silu if f["swiglu"] else F.gelu, add_bias_linear=f["bias"], add_qkv_bias=f["bias"],
        bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False,
        persist_layer_norm=False, apply_rope_fusion=False, gradient_accumulation_fusion=False, hidden_dropout=0.0,
        attention_dropout=0.0, layernorm_epsilon=1e-5, tensor_model_parallel_size=a.tp, params_dtype=torch.float32)
    model = GPTModel(config=config, transformer_layer_spec=get_gpt_layer_local_spec(normalization=f["normalization"]),
                     vocab_size=padded, max_sequence_length=64, parallel_output=False,
                     share_embeddings_and_output_weights=not f["untie"], position_embedding_type=f["position"],
                     rotary_percent=f.get("rotary_percent", 1.0))
    if a.load_dir:
        state = dist_checkpointing.load({"model": model.sharded_state_dict()}, a.load_dir)
        model.load_state_dict(state["model"])
    else:
        g = torch.Generator().manual_seed(7 + dist.get_rank())
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
                if not getattr(p, "tensor_model_parallel", False):  # replicated: every TP rank holds rank 0's
                    dist.broadcast(p, 0)
    model.eval()
    tokens = torch.load(a.tokens)
    positions = torch.arange(tokens.shape[1])[None]
    masked = torch.ones(tokens.shape[1], tokens.shape[1], dtype=torch.bool).triu(1)[None, None]  # True: hidden
    with torch.no_grad():
        logits = model(tokens, positions, attention_mask=masked)[..., :a.vocab_size]
    if dist.get_rank() == 0:
        torch.save(logits, a.logits)
    if a.save:
        name = os.path.join(a.save, f"iter_{a.iteration:07d}")
        common = {"args": megatron_args(a, f, padded), "checkpoint_version": 3.0, "iteration": a.iteration}
        os.makedirs(name, exist_ok=True)
        dist.barrier()
        if a.format == "torch_dist":
            dist_checkpointing.save(dict(common, model=model.sharded_state_dict()), name)
        else:
            rank_dir = os.path.join(name, f"mp_rank_{parallel_state.get_tensor_model_parallel_rank():02d}")
            os.makedirs(rank_dir, exist_ok=True)
            torch.save(dict(common, model=model.state_dict()), os.path.join(rank_dir, "model_optim_rng.pt"))
        dist.barrier()
        if dist.get_rank() == 0:
            with open(os.path.join(a.save, "latest_checkpointed_iteration.txt"), "w") as fh:
                fh.write(str(a.iteration))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
