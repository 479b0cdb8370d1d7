"""The DeepSpeed path: config rendering, exact resume from DeepSpeed's engine state, and its checkpoints' weights
loading into megalm's own path. (Parity with one process is in test_layout_parity.py.)"""
import json
import os
import re

import pytest

from conftest import deepspeed_launch, require, tiny_train_flags
from megalm.config import ConfigError, load_config
from megalm.pretrain import main

NULL = ["--tokenizer-type", "NullTokenizer", "--vocab-size", "100"]


def test_config_rendered_from_flags_and_file(tmp_path):
    from megalm.training.deepspeed_trainer import render_deepspeed_config

    cfg = load_config([*NULL, "--deepspeed", "--zero-stage", "2", "--micro-batch-size", "2",
                       "--global-batch-size", "8", "--bf16", "--clip-grad", "0.5"], world_size=2)
    ds = render_deepspeed_config(cfg, micro_batches=2)
    assert ds["train_batch_size"] == 8 and ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 2 and ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"] == {"stage": 2} and ds["bf16"] == {"enabled": True}
    f = tmp_path / "ds.json"
    f.write_text(json.dumps({"zero_optimization": {"stage": 3, "overlap_comm": True}}))
    cfg.parallel.deepspeed_config = str(f)
    assert render_deepspeed_config(cfg, 2)["zero_optimization"] == {"stage": 3, "overlap_comm": True}
    f.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4}))
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu is 4, but megalm's flags give 2"):
        render_deepspeed_config(cfg, 2)


@pytest.mark.parametrize("argv, message", [
    (["--deepspeed", "--pipeline-model-parallel-size", "2"], "--deepspeed runs data parallelism (ZeRO 0-3) with"),
    (["--deepspeed_config", "x.json"], "--deepspeed_config needs --deepspeed"),
])
def test_impossible_deepspeed_layouts(argv, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config([*NULL, *argv], world_size=2)


@pytest.mark.parametrize("nproc, layout", [(2, []), (4, ["--tensor-model-parallel-size", "2"])],
                         ids=["dp2", "tp2-dp2"])
def test_deepspeed_exact_resume_and_weights_elsewhere(tmp_path, dataset_prefix, bpe_flags, nproc, layout):
    """With hidden and attention dropout: every rank's own random streams come back (TP ranks' trackers differ).
    --keep-last-n removes an old iteration together with the engine state inside it."""
    require("deepspeed")
    flags = tiny_train_flags(dataset_prefix, bpe_flags, "--train-iters", "6", "--deepspeed", "--zero-stage", "2",
                             "--hidden-dropout", "0.1", "--attention-dropout", "0.1", *layout)
    res = deepspeed_launch(nproc, "megalm/pretrain.py", *flags, "--save", tmp_path / "ck", "--save-interval", "2",
                           "--keep-last-n", "2", "--metrics-file", tmp_path / "full.jsonl")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert sorted(os.listdir(tmp_path / "ck")) == ["iter_0000004", "iter_0000006", "latest_checkpointed_iteration.txt"]
    res = deepspeed_launch(nproc, "megalm/pretrain.py", *flags, "--load", tmp_path / "ck" / "iter_0000004",
                           "--metrics-file", tmp_path / "resumed.jsonl")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    full = [json.loads(line) for line in open(tmp_path / "full.jsonl")]
    resumed = [json.loads(line) for line in open(tmp_path / "resumed.jsonl")]
    full = [(r["loss"], r["grad_norm"]) for r in full if "loss" in r][4:]
    assert [(r["loss"], r["grad_norm"]) for r in resumed if "loss" in r] == full
    assert os.path.isdir(tmp_path / "ck" / "iter_0000004" / "deepspeed")  # the engine state inside its iteration
    # megalm's own path (one process) fine-tunes from the DeepSpeed run's weights
    plain = [str(a) for a in tiny_train_flags(dataset_prefix, bpe_flags, "--train-iters", "2")]
    assert main(plain + ["--load", str(tmp_path / "ck"), "--finetune"]) == 0
