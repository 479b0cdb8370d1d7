"""Experiment tracking and pictures: W&B offline runs hold the metrics; megalm-plot draws the curves of one or
several runs, one panel per logged quantity."""
import json
import os

import pytest

from conftest import require, run_module, tiny_train_flags
from megalm.tools.plot import main as plot_main, plot, read_metrics


def wandb_records(path):
    """The protobuf records of a W&B run file: a 7-byte header, then LevelDB-log records (4-byte checksum, 2-byte
    length, 1-byte type: 1 whole, 2 first, 3 middle, 4 last part) in 32 KiB blocks."""
    from wandb.proto import wandb_internal_pb2

    data, pos, parts, out = open(path, "rb").read(), 7, b"", []
    while pos + 7 <= len(data):
        room = 32768 - pos % 32768
        if room < 7:  # the block's tail is padding
            pos += room
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if kind == 0:
            break
        parts += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            out.append(record)
            parts = b""
    return out


def test_wandb_offline_run_holds_the_metrics(tmp_path, dataset_prefix, bpe_flags):
    require("wandb")
    argv = tiny_train_flags(dataset_prefix, bpe_flags, "--train-iters", "4", "--wandb-project", "megalm-test",
                            "--wandb-exp-name", "tiny", "--wandb-save-dir", tmp_path / "wb",
                            "--metrics-file", tmp_path / "m.jsonl")
    res = run_module("megalm.pretrain", *argv, env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    assert res.returncode == 0, res.stderr[-3000:]
    runs = [d for d in os.listdir(tmp_path / "wb" / "wandb") if d.startswith("offline-run-")]
    assert len(runs) == 1
    run_dir = tmp_path / "wb" / "wandb" / runs[0]
    records = wandb_records(next(run_dir.glob("run-*.wandb")))
    history = [{i.key or ".".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    ours = [json.loads(line) for line in open(tmp_path / "m.jsonl") if '"loss"' in line]
    logged = [h for h in history if "loss" in h]
    assert [h["_step"] for h in logged] == [1, 2, 3, 4]
    assert [h["loss"] for h in logged] == pytest.approx([r["loss"] for r in ours])
    assert any("valid_loss" in h for h in history)
    config = [i.key or ".".join(i.nested_key) for r in records if r.WhichOneof("record_type") == "run"
              for i in r.run.config.update]
    assert {"model", "train", "optim"} <= set(config)  # the run's whole config travels with it


def test_plot_overlays_runs_with_a_panel_per_metric(tmp_path):
    require("matplotlib")
    for name, scale in (("a", 1.0), ("b", 0.9)):
        with open(tmp_path / f"{name}.jsonl", "w") as fh:
            for i in range(1, 11):
                fh.write(json.dumps({"iteration": i, "loss": scale * (7 - 0.3 * i), "lr": 1e-3 * i / 10,
                                     "grad_norm": 1.0 / i, "tokens_per_sec": 1000 + i, "mfu": 0.3}) + "\n")
            fh.write(json.dumps({"iteration": 10, "valid_loss": scale * 4.2, "valid_ppl": 66.7}) + "\n")
    fig = plot({n: read_metrics(str(tmp_path / f"{n}.jsonl")) for n in ("a", "b")}, str(tmp_path / "c.png"))
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible()]
    assert titles == ["loss", "learning rate", "gradient norm", "throughput", "MFU"]
    loss_axis = fig.axes[0]
    assert [line.get_label() for line in loss_axis.get_lines()] == ["a", "a (valid_loss)", "b", "b (valid_loss)"]
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_main([str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl"), "-o", str(tmp_path / "d.png")]) == 0
    (tmp_path / "bad.jsonl").write_text('{"iteration": 1, "loss": 2}\nnot json\n')
    assert plot_main([str(tmp_path / "bad.jsonl"), "-o", str(tmp_path / "e.png")]) == 2
    assert not (tmp_path / "e.png").exists()
