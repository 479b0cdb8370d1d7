"""The main job itself: launch/quickstart.sh, shortened by its environment variables (the suite has installed
everything already), and what it leaves behind: the dataset, the checkpoint, the loss drop, the curves, the
samples."""
import json
import os
import subprocess

from conftest import ROOT
from megalm.data.indexed import IndexedDataset
from megalm.training import checkpoint as ckpt


def test_quickstart_runs_end_to_end(tmp_path):
    out = tmp_path / "qs"
    env = dict(os.environ, QUICKSTART_SKIP_INSTALL="1", QUICKSTART_DIR=str(out), QUICKSTART_CORPUS_MB="1",
               QUICKSTART_TRAIN_ITERS="60", PYTHONUNBUFFERED="1")
    res = subprocess.run(["bash", "launch/quickstart.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    data = IndexedDataset(str(out / "corpus_text_document"))
    assert data.num_documents > 100
    assert (out / "checkpoints" / ckpt.LATEST).read_text() == "60"
    state = ckpt.read_checkpoint(str(out / "checkpoints"), parts=("model",))
    assert state["meta"]["layout"] == {"tp": 2, "pp": 2, "dp": 1, "ep": 1, "cp": 1, "zero_stage": 0}
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    first = next(r["loss"] for r in rows if "loss" in r)
    valid = [r["valid_loss"] for r in rows if "valid_loss" in r]
    assert len(valid) == 3 and valid[-1] < 0.85 * first
    drop = round(100 * (1 - valid[-1] / first))
    assert f"final validation loss: {valid[-1]:.3f} ({drop}% lower)" in res.stdout
    assert f"wrote {out}/curves.png" in res.stdout
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for prompt in ("Return a new list", "The file object"):
        sample = res.stdout.split(f"--- prompt: {prompt!r}\n")[1].split("--- prompt:")[0].strip()
        assert sample.startswith(prompt) and len(sample.split()) > len(prompt.split()), sample
