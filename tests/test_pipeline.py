"""Pipeline layout and its configuration errors (schedules are checked end to end in test_layout_parity.py)."""
import pytest

from megalm.config import ConfigError, load_config
from megalm.pipeline.layout import stage_chunks
from megalm.pipeline.schedules import bubble_fraction

NULL = ["--tokenizer-type", "NullTokenizer", "--vocab-size", "100"]


def test_even_uneven_and_interleaved_splits():
    assert [stage_chunks(8, 4, r) for r in range(4)] == [[[0, 1]], [[2, 3]], [[4, 5]], [[6, 7]]]
    assert [stage_chunks(8, 3, r, stage_layers=[3, 3, 2]) for r in range(3)] == [
        [[0, 1, 2]], [[3, 4, 5]], [[6, 7]]]
    # virtual stage c * P + r: rank 0 holds layers 0 and 4, rank 1 holds 2 and 6 ... with one layer per chunk
    assert [stage_chunks(8, 4, r, 1) for r in range(4)] == [[[0], [4]], [[1], [5]], [[2], [6]], [[3], [7]]]
    assert stage_chunks(8, 2, 1, 2) == [[2, 3], [6, 7]]
    every = sorted(i for r in range(4) for chunk in stage_chunks(16, 4, r, 2) for i in chunk)
    assert every == list(range(16))


def test_bubble_fraction():
    assert bubble_fraction(4, 8) == pytest.approx(3 / 11)
    assert bubble_fraction(4, 8, 2) == pytest.approx(3 / 19)
    assert bubble_fraction(1, 8) == 0


@pytest.mark.parametrize("argv, message", [
    (["--num-layers", "6", "--pipeline-model-parallel-size", "4"],
     "--num-layers 6 is not divisible by --pipeline-model-parallel-size 4"),
    (["--num-layers", "2", "--pipeline-model-parallel-size", "4"],
     "--pipeline-model-parallel-size 4 is larger than --num-layers 2"),
    (["--num-layers", "8", "--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "2",
      "--micro-batch-size", "1", "--global-batch-size", "6"], "needs the micro-batches per step (3 "),
    (["--num-layers", "8", "--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "3"],
     "--num-layers-per-virtual-pipeline-stage 3 must divide the 4 layers"),
    (["--num-layers", "8", "--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "4"],
     "at least two chunks"),
    (["--num-layers", "8", "--num-layers-per-virtual-pipeline-stage", "2"], "needs --pipeline-model-parallel-size"),
    (["--num-layers", "8", "--pipeline-model-parallel-size", "2", "--pipeline-stage-layers", "5", "2"],
     "sum to --num-layers"),
    (["--num-layers", "8", "--pipeline-model-parallel-size", "2", "--pipeline-stage-layers", "8", "0"],
     "positive counts"),
])
def test_impossible_pipelines_name_the_flag(argv, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_config([*NULL, *argv], world_size=4)


def test_world_size_must_fit_the_layout():
    with pytest.raises(ConfigError, match="world size 6 is not divisible by --tensor-model-parallel-size 2 x "
                                          "--pipeline-model-parallel-size 4"):
        load_config([*NULL, "--num-layers", "4", "--tensor-model-parallel-size", "2",
                     "--pipeline-model-parallel-size", "4"], world_size=6)
    cfg = load_config([*NULL, "--num-layers", "4", "--tensor-model-parallel-size", "2",
                       "--pipeline-model-parallel-size", "2", "--micro-batch-size", "2"], world_size=8)
    assert cfg.train.global_batch_size == 4  # micro batch x DP 2
    assert load_config([*NULL, "--num-layers", "8", "--pipeline-stage-layers", "5", "3",
                        "--pipeline-model-parallel-size", "2"], world_size=2).parallel.pipeline_stage_layers == [5, 3]
