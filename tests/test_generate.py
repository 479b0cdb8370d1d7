"""megalm-generate from a trained checkpoint: prompts printed, KV cache and recompute give the same greedy text."""
from conftest import run_module, tiny_train_flags
from megalm.pretrain import main


def test_generate_cli(tmp_path, dataset_prefix, bpe_flags):
    flags = tiny_train_flags(dataset_prefix, bpe_flags, "--train-iters", "3", "--save", str(tmp_path / "ck"))
    assert main([str(f) for f in flags]) == 0
    outs = []
    for extra in ([], ["--no-kv-cache"]):
        res = run_module("megalm.generate", "--load", tmp_path / "ck", "--prompt", "Return the", "--prompt",
                         "The object", "--max-new-tokens", "12", "--no-stop-at-eod", *extra)
        assert res.returncode == 0, res.stderr
        assert "--- prompt: 'Return the'" in res.stdout and "--- prompt: 'The object'" in res.stdout
        outs.append(res.stdout)
    assert outs[0] == outs[1]
    res = run_module("megalm.generate", "--load", tmp_path / "ck", "--prompt", "x", "--temperature", "0.9",
                     "--top-k", "20", "--top-p", "0.9", "--max-new-tokens", "5")
    assert res.returncode == 0, res.stderr
    res = run_module("megalm.generate", "--load", tmp_path / "nothing", "--prompt", "x")
    assert res.returncode == 2 and "not a megalm checkpoint" in res.stderr
