"""FSDP2 (``--use-torch-fsdp2``) through ``torchrun megalm/pretrain.py``: the losses, grad norms and final
parameters of one process (fp32: 1e-5 / 1e-4 / 1e-4), under DP alone and composed with TP + SP, PP and EP; bf16
within the mixed-precision tolerance; its memory from the tensors; its checkpoints resumed under ZeRO 1 and one
process and the other way round."""
import pytest
import torch

from conftest import pretrain_run, tiny_train_flags
from parity import assert_close
from megalm.training.checkpoint import read_checkpoint
from test_mixed_precision import LLAMA_DEEP, LOSS_TOLERANCE
from test_layout_parity import FLAVOURS, NO_EFFECT
from test_moe import MOE

FSDP = ["--use-torch-fsdp2"]
TP2 = ["--tensor-model-parallel-size", "2", "--sequence-parallel"]
PP2 = ["--pipeline-model-parallel-size", "2"]

# name: (processes, flavour, flags)
LAYOUTS = {
    "fsdp2-gpt2": (2, "gpt2", FSDP),
    "fsdp4-llama-deep-no-reshard": (4, "llama-deep", FSDP + ["--no-fsdp-reshard-after-forward"]),
    "cp2-fsdp2-llama": (4, "llama", FSDP + ["--context-parallel-size", "2"]),  # sharded over DP x CP
    "tp2-sp-fsdp2-llama": (4, "llama", FSDP + TP2),
    "pp2-fsdp2-gpt2-deep": (4, "gpt2-deep", FSDP + PP2),
    "ep2-moe": (2, "moe", FSDP + ["--expert-model-parallel-size", "2"]),  # experts whole: one rank each
    "ep2-fsdp2-moe": (4, "moe", FSDP + ["--expert-model-parallel-size", "2"]),  # experts sharded over 2 ranks
}
VARIANTS = {**FLAVOURS, "moe": MOE}


def run(tmp, dataset_prefix, bpe_flags, nproc, *flags, iters=10):
    metrics, params = pretrain_run(tmp, nproc, tiny_train_flags(dataset_prefix, bpe_flags, "--train-iters",
                                                                str(iters), *flags))
    return [r for r in metrics if "loss" in r], params


@pytest.fixture(scope="module")
def single(tmp_path_factory, dataset_prefix, bpe_flags):
    cache = {}

    def get(variant):
        if variant not in cache:
            cache[variant] = run(tmp_path_factory.mktemp(f"single-{variant}"), dataset_prefix, bpe_flags, 1,
                                 *VARIANTS[variant])
        return cache[variant]
    return get


def assert_matches(what, ref, got, loss_tol=1e-5, grad_tol=1e-4, param_tol=1e-4):
    (ref_rows, ref_params), (got_rows, got_params) = ref, got
    assert len(got_rows) == len(ref_rows)
    for a, b in zip(ref_rows, got_rows, strict=True):
        assert abs(a["loss"] - b["loss"]) <= loss_tol * abs(a["loss"]), f"{what} iteration {a['iteration']} loss"
        assert abs(a["grad_norm"] - b["grad_norm"]) <= grad_tol * a["grad_norm"], \
            f"{what} iteration {a['iteration']} grad norm {a['grad_norm']} vs {b['grad_norm']}"
    assert set(got_params) == set(ref_params)
    for name, ref_param in ref_params.items():
        if not name.endswith(NO_EFFECT):
            assert_close(got_params[name].float(), ref_param.float(), param_tol, f"{what} final {name}")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_fsdp2_matches_one_process(tmp_path, dataset_prefix, bpe_flags, single, layout):
    nproc, variant, flags = LAYOUTS[layout]
    got = run(tmp_path, dataset_prefix, bpe_flags, nproc, *VARIANTS[variant], *flags)
    assert_matches(layout, single(variant), got)


def test_fsdp2_bf16_matches_one_process_and_holds_16_bytes_per_parameter(tmp_path, dataset_prefix, bpe_flags):
    """bf16 at DP 2 against one process in bf16: losses within the mixed-precision tolerance (1e-4 relative), the
    saved fp32 main parameters within 2e-2, the weights saved in bf16. Memory per rank, from the tensors after the
    first step: fp32 shards (which are the main parameters: FSDP2 keeps no bf16 copy of its own shard, it casts
    as it gathers), fp32 gradients and the Adam moments, (4 + 4 + 8) / DP bytes per parameter within 5%;
    Megatron's layout, a bf16 shard beside fp32 main parameters, would be (2 + 4 + 12) / DP."""
    base = [*LLAMA_DEEP, "--eval-interval", "100", "--lr", "3e-3", "--bf16"]
    ref_rows, _ = run(tmp_path / "one", dataset_prefix, bpe_flags, 1, *base)
    got_rows, _ = run(tmp_path / "fsdp", dataset_prefix, bpe_flags, 2, *base, *FSDP)
    worst = max(abs(a["loss"] - b["loss"]) / a["loss"] for a, b in zip(ref_rows, got_rows, strict=True))
    assert worst < LOSS_TOLERANCE, worst
    ref_ck, got_ck = (read_checkpoint(str(tmp_path / d / "ck")) for d in ("one", "fsdp"))
    for name, state in ref_ck["optimizer"].items():
        assert_close(got_ck["optimizer"][name]["main_param"], state["main_param"], 2e-2, f"bf16 {name}")
        assert got_ck["model"][name].dtype == ref_ck["model"][name].dtype == torch.bfloat16
    n = ref_rows[0]["param_bytes"] // 2  # bf16 parameters of one process
    first = got_rows[0]
    assert first["main_param_bytes"] == 0
    for key, per_param in (("param_bytes", 4), ("grad_bytes", 4), ("optimizer_state_bytes", 8)):
        assert abs(first[key] / (n / 2) - per_param) < 0.05 * per_param, (key, first[key], n)


def test_fsdp2_checkpoints_resume_under_zero1_and_one_process_and_back(tmp_path, dataset_prefix, bpe_flags):
    """An FSDP2 run (DP 2, 15 iterations, saved every 5) is continued from its iteration-5 checkpoint by ZeRO 1
    at DP 2 and by one process, and FSDP2 continues from the ZeRO 1 run's iteration 10: each repeats the
    uninterrupted run's losses and grad norms (to the parity tolerances: the layouts sum in other orders)."""
    base = [*FLAVOURS["llama"], "--eval-interval", "100", "--save-interval", "5"]

    def resumed(name, nproc, load, *flags):  # the same 15-iteration schedule, stopped at 10 or run to the end
        rows, _ = run(tmp_path / name, dataset_prefix, bpe_flags, nproc, *base, "--load", load, *flags, iters=15)
        return rows

    full, _ = run(tmp_path / "full", dataset_prefix, bpe_flags, 2, *base, *FSDP, iters=15)
    zero1 = resumed("zero1", 2, tmp_path / "full" / "ck" / "iter_0000005", "--zero-stage", "1", "--exit-interval", "10")
    one = resumed("one", 1, tmp_path / "full" / "ck" / "iter_0000005", "--exit-interval", "10")
    back = resumed("back", 2, tmp_path / "zero1" / "ck" / "iter_0000010", *FSDP)
    for what, rows, start in (("ZeRO 1", zero1, 5), ("one process", one, 5), ("FSDP2 from ZeRO 1", back, 10)):
        assert [r["iteration"] for r in rows] == list(range(start + 1, start + 6)), what
        for a, b in zip(full[start:start + 5], rows, strict=True):
            assert abs(a["loss"] - b["loss"]) <= 1e-5 * a["loss"], (what, a["iteration"])
            assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-4 * a["grad_norm"], (what, a["iteration"])


@pytest.mark.parametrize("argv, message", [
    (FSDP + ["--deepspeed"], "--use-torch-fsdp2 with --deepspeed: choose one"),
    (FSDP + ["--zero-stage", "1"], "--use-torch-fsdp2 shards parameters, gradients and optimizer state itself: "
                                   "drop --zero-stage 1"),
    (FSDP + ["--use-distributed-optimizer"], "drop --zero-stage 1 / --use-distributed-optimizer"),
    (["--no-fsdp-reshard-after-forward"], "--no-fsdp-reshard-after-forward needs --use-torch-fsdp2"),
    (["--zero-stage", "3"], "--zero-stage 3 \\(sharded parameters\\) needs --use-torch-fsdp2 or --deepspeed"),
])
def test_fsdp2_refusals(argv, message):
    from megalm.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=message):
        load_config(["--tokenizer-type", "NullTokenizer", "--vocab-size", "100", *argv], world_size=2)
