"""The documented lm-eval route (scripts/lm_eval_local.py) on an exported tiny model, offline."""
import json
import math
import subprocess

from conftest import PYTHON, ROOT, require, tiny_train_flags
from megalm.pretrain import main
from megalm.interop.hf import export_main


def test_lm_eval_on_exported_model(tmp_path, dataset_prefix, bpe_flags, corpus):
    require("lm_eval")
    flags = tiny_train_flags(dataset_prefix, bpe_flags, "--train-iters", "3", "--save", tmp_path / "ck")
    assert main([str(f) for f in flags]) == 0
    assert export_main(["--load", str(tmp_path / "ck"), "--output", str(tmp_path / "hf")]) == 0
    choices = tmp_path / "choices.jsonl"
    choices.write_text("".join(json.dumps({"question": q, "choices": c, "answer": 0}) + "\n"
                               for q, c in [("The file", [" object", " zebra"]), ("Return a", [" list", " qq"])]))
    res = subprocess.run([PYTHON, "scripts/lm_eval_local.py", "--model", tmp_path / "hf", "--data", corpus,
                          "--choices", choices, "--output", tmp_path / "out", "--limit", "3"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    results = json.loads(res.stdout[res.stdout.rindex("\n{\n"):])
    assert math.isfinite(results["megalm_local_ppl"]["word_perplexity,none"])
    assert results["megalm_local_choice"]["acc,none"] == expected_accuracy(tmp_path / "hf", choices)


def expected_accuracy(folder, choices):
    """The multiple-choice accuracy computed here with transformers: for each question, the choice whose
    continuation (lm-eval's " " delimiter, then the choice) has the largest summed log-likelihood."""
    import torch
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    right = []
    for line in open(choices):
        doc = json.loads(line)
        context = tok(doc["question"])["input_ids"]
        scores = []
        for choice in doc["choices"]:
            whole = tok(doc["question"] + " " + choice)["input_ids"]
            with torch.no_grad():
                logp = model(torch.tensor([whole])).logits[0].log_softmax(-1)
            scores.append(sum(logp[i - 1, whole[i]].item() for i in range(len(context), len(whole))))
        right.append(max(range(len(scores)), key=scores.__getitem__) == doc["answer"])
    return sum(right) / len(right)
