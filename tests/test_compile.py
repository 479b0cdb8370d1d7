"""``--torch-compile``: dense and multi-latent-attention blocks compile whole (no graph breaks, counted by
dynamo's explain), MoE blocks compile around their data-dependent dispatch, and training compiled gives eager's losses and grad norms at TP 2 x PP 2 with full recomputation
through ``torchrun megalm/pretrain.py`` (fp32, 1e-5), with no graph break in the run either."""
import pytest
import torch

from conftest import pretrain_run, tiny_train_flags
from parity import FLAVOURS, VOCAB, fixed_batch, parity_model_config
from megalm.model.gpt import GPT
from test_layout_parity import FLAVOURS as FLAGS

BLOCKS = {**FLAVOURS, "moe": dict(FLAVOURS["llama"], num_experts=4, moe_router_topk=2,
                                  moe_aux_loss_coeff=0.01, moe_shared_expert_intermediate_size=32)}


def block_and_inputs(flavour):
    model = GPT(parity_model_config(**BLOCKS[flavour]), VOCAB)
    model.init_weights(0)
    model.train()
    tokens, _ = fixed_batch()
    positions, rope, mask = model.attention_inputs(tokens, None)
    return model.layers["0"], (model.embed(tokens, positions).detach(), rope, None, mask)


@pytest.mark.parametrize("flavour", ["gpt2", "llama", "mla"])
def test_a_dense_block_compiles_without_graph_breaks(flavour):
    block, inputs = block_and_inputs(flavour)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(block)(*inputs)
    assert explained.graph_break_count == 0, [str(b.reason) for b in explained.break_reasons]
    assert explained.graph_count == 1


def test_an_moe_block_compiles_and_matches_eager():
    """An MoE block's token dispatch has data-dependent shapes (tokens per expert), where dynamo breaks the graph
    (counted, not zero); the compiled block still gives eager's output and gradients."""
    block, inputs = block_and_inputs("moe")
    eager = block(*inputs)
    eager.sum().backward()
    grads = {n: p.grad.clone() for n, p in block.named_parameters()}
    block.zero_grad()
    torch._dynamo.reset()
    compiled = torch.compile(block)(*inputs)
    compiled.sum().backward()
    assert torch.allclose(compiled, eager, rtol=1e-5, atol=1e-6)
    for n, p in block.named_parameters():
        assert torch.allclose(p.grad, grads[n], rtol=1e-4, atol=1e-6), n


def test_compiled_training_matches_eager_at_tp2_pp2_with_recomputation(tmp_path, dataset_prefix, bpe_flags):
    flags = tiny_train_flags(dataset_prefix, bpe_flags, "--train-iters", "6", *FLAGS["llama-deep"],
                             "--tensor-model-parallel-size", "2", "--sequence-parallel",
                             "--pipeline-model-parallel-size", "2", "--recompute-granularity", "full",
                             "--eval-interval", "100")
    eager, _ = pretrain_run(tmp_path / "eager", 4, flags)
    compiled, _ = pretrain_run(tmp_path / "compiled", 4, flags + ["--torch-compile"])
    eager, compiled = ([r for r in rows if "loss" in r] for rows in (eager, compiled))
    assert len(eager) == len(compiled) == 6
    for a, b in zip(eager, compiled, strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * a["loss"], a["iteration"]
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-5 * a["grad_norm"], a["iteration"]
    assert compiled[0]["compile_graph_breaks"] == 0
