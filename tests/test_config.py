import os

import pytest
import yaml

from megalm.config import Config, ConfigError, build_parser, load_config, parse_data_path, parse_split

NULL = ["--tokenizer-type", "NullTokenizer", "--vocab-size", "100"]

MEGATRON_FLAGS = ("--num-layers --hidden-size --ffn-hidden-size --num-attention-heads --num-query-groups --seq-length "
                  "--max-position-embeddings --micro-batch-size --global-batch-size --train-iters --lr --min-lr "
                  "--lr-decay-style --lr-warmup-iters --weight-decay --clip-grad --adam-beta1 --adam-beta2 --seed "
                  "--data-path --split --tokenizer-type --tokenizer-model --vocab-file --merge-file --save --load "
                  "--save-interval --eval-interval --eval-iters --log-interval --tensorboard-dir --bf16 --fp16 "
                  "--position-embedding-type --normalization --swiglu --untie-embeddings-and-output-weights "
                  "--metrics-file --tensor-model-parallel-size --disable-bias-linear --async-save --timing-log-level "
                  "--use-rope-scaling --add-qkv-bias --context-parallel-size --cp-comm-type").split()


def test_every_megatron_flag_exists():
    known = {opt for action in build_parser()._actions for opt in action.option_strings}
    assert set(MEGATRON_FLAGS) <= known, set(MEGATRON_FLAGS) - known


def test_yaml_then_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": {"num_layers": 3, "hidden_size": 96, "swiglu": True},
                                    "train": {"micro_batch_size": 2}}))
    cfg = load_config(["--config", str(path), "--hidden-size", "64", "--lr", "0.01", *NULL])
    assert cfg.model.num_layers == 3  # from YAML
    assert cfg.model.hidden_size == 64  # flag wins
    assert cfg.model.swiglu and cfg.optim.lr == 0.01
    assert cfg.model.ffn_hidden_size == int(4 * 64 * 2 / 3 / 64) * 64  # Megatron's SwiGLU default
    assert cfg.train.global_batch_size == 2  # micro batch x DP 1
    assert cfg.optim.lr_decay_iters == cfg.train.train_iters


def test_shipped_configs_load():
    root = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs")
    for name in sorted(os.listdir(root)):
        if name.endswith(".yaml"):
            cfg = load_config(["--config", os.path.join(root, name), *NULL])
            assert cfg.model.num_layers > 0


def test_bool_flags_and_disable():
    cfg = load_config(["--swiglu", "--disable-bias-linear", "--bf16", *NULL])
    assert cfg.model.swiglu and not cfg.model.add_bias_linear and cfg.train.bf16


@pytest.mark.parametrize("argv, message", [
    (["--hidden-size", "100", "--num-attention-heads", "3"], "--hidden-size 100 is not divisible by --num-attention-heads 3"),
    (["--num-attention-heads", "4", "--num-query-groups", "3"], "not divisible by --num-query-groups 3"),
    (["--num-layers", "0"], "--num-layers must be positive"),
    (["--seq-length", "256", "--max-position-embeddings", "128"], "--max-position-embeddings 128 is smaller"),
    (["--micro-batch-size", "3", "--global-batch-size", "8"], "--global-batch-size 8 is not divisible"),
    (["--bf16", "--fp16"], "mutually exclusive"),
    (["--fp16", "--grad-reduce-in-bf16"], "--grad-reduce-in-bf16 needs --bf16"),
    (["--bf16", "--grad-reduce-in-bf16", "--deepspeed"], "--grad-reduce-in-bf16 is for megalm's optimizer"),
    (["--lr", "0.001", "--min-lr", "0.01"], "--min-lr"),
    (["--lr-warmup-iters", "50", "--lr-decay-iters", "10"], "--lr-decay-iters 10 is smaller"),
    (["--split", "a,b"], "--split"),
    (["--split", "0,0,0"], "--split"),
    (["--hidden-dropout", "1.5"], "--hidden-dropout"),
    (["--hidden-size", "36", "--num-attention-heads", "4", "--position-embedding-type", "rope"], "even head size"),
    (["--tensor-model-parallel-size", "3"], "not divisible by --tensor-model-parallel-size 3"),
    (["--data-path", "/nonexistent/prefix"], "/nonexistent/prefix.idx does not exist"),
    (["--data-path", "0.5", "A", "B"], "weight-prefix pairs"),
    (["--save-interval", "10"], "--save-interval needs --save"),
    (["--load", "/nonexistent/ckpt"], "--load: no checkpoint directory"),
    (["--use-rope-scaling"], "--use-rope-scaling needs --position-embedding-type rope"),
    (["--position-embedding-type", "rope", "--use-rope-scaling", "--rope-scaling-high-freq-factor", "0.5"],
     "--rope-scaling-high-freq-factor above the low one"),
    (["--sliding-window", "0"], "--sliding-window must be at least 1, got 0"),
])
def test_validation_errors_name_the_flag(argv, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_config([*NULL, *argv])


def test_tokenizer_validation(tmp_path):
    with pytest.raises(ConfigError, match="GPT2BPETokenizer needs --vocab-file"):
        load_config([])
    with pytest.raises(ConfigError, match="--vocab-file: .*missing.json does not exist"):
        load_config(["--vocab-file", str(tmp_path / "missing.json"), "--merge-file", str(tmp_path / "m.txt")])
    with pytest.raises(ConfigError, match="--vocab-size"):
        load_config(["--tokenizer-type", "NullTokenizer"])
    with pytest.raises(SystemExit):  # argparse rejects an unknown tokenizer type, naming the choices
        load_config(["--tokenizer-type", "BogusTokenizer"])


def test_yaml_errors_name_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  num_layerz: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key 'model.num_layerz'"):
        load_config(["--config", str(bad), *NULL])
    bad.write_text("modle:\n  num_layers: 3\n")
    with pytest.raises(ConfigError, match="unknown section 'modle'"):
        load_config(["--config", str(bad), *NULL])
    bad.write_text("model:\n  num_layers: three\n")
    with pytest.raises(ConfigError, match="model.num_layers: expected int"):
        load_config(["--config", str(bad), *NULL])
    with pytest.raises(ConfigError, match="--config: no such file"):
        load_config(["--config", str(tmp_path / "none.yaml"), *NULL])


def test_split_and_blend_parsing():
    assert parse_split("969,30,1") == pytest.approx([0.969, 0.030, 0.001])
    assert parse_split("1") == [1.0, 0.0, 0.0]
    assert parse_data_path(["A"]) == [(1.0, "A")]
    assert parse_data_path(["1", "A", "3", "B"]) == [(0.25, "A"), (0.75, "B")]


def test_round_trip_through_dict():
    cfg = load_config(["--num-layers", "5", *NULL])
    again = Config.from_dict(cfg.to_dict())
    assert again == cfg


def test_help_and_refusals_are_pinned(tmp_path):
    """Every command's --help and the message of every refused input equal tests/data/config_golden.json, written
    by tests/config_golden.py from the code before the config package was split by section (and rewritten since
    only where a flag was added: the help texts gained lines, no message changed)."""
    import json

    from config_golden import GOLDEN, surface

    with open(GOLDEN) as fh:
        pinned = json.load(fh)
    now = surface(str(tmp_path))
    assert now["help"].keys() == pinned["help"].keys()
    for command, text in pinned["help"].items():
        assert now["help"][command] == text, command
    assert [case[:2] for case in now["refused"]] == [case[:2] for case in pinned["refused"]]
    for (argv, world_size, message), (_, _, expected) in zip(now["refused"], pinned["refused"]):
        assert message == expected, (argv, world_size)
    assert all(expected != "accepted" for _, _, expected in pinned["refused"])
    assert now["yaml"] == pinned["yaml"]
