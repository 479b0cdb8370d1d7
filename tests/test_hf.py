"""Hugging Face interop: export from a TP 2 x PP 2 checkpoint loads in transformers with megalm's logits and greedy
tokens; import -> export is the identity; an imported model's loss equals transformers'."""
import pytest
import torch

from conftest import tiny_train_flags, torchrun
from megalm.generate import generate, load_for_inference
from megalm.parallel.state import Topology
from megalm.tools.hf import export_main, import_main

transformers = pytest.importorskip("transformers")
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
