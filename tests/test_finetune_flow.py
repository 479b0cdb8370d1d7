"""The README's fine-tuning commands, in order, on a tiny Llama that transformers builds with Llama 3.1's chat
template: import, SFT at TP 2 x PP 2, LoRA at DP 2 with ZeRO 1, DPO with LoRA at TP 2 from the SFT model, the three
exports (whole, merged, PEFT), and lm-eval on the merged model and on the base with the PEFT adapters."""
import json
import os
import subprocess

import pytest
import torch

from chat_data import WORDS, tiny_tokenizer
from conftest import PYTHON, ROOT, require, run_module, torchrun


def test_readme_fine_tuning_flow(tmp_path):
    transformers, peft = require("transformers"), require("peft")
    require("lm_eval")
    hf = tmp_path / "Llama-3.1-tiny-Instruct"
    tiny_tokenizer(hf, "llama3_1")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(transformers.AutoTokenizer.from_pretrained(hf)), hidden_size=32,
                                      intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=256,
                                      tie_word_embeddings=False)
    transformers.LlamaForCausalLM(config).save_pretrained(hf)
    with open(tmp_path / "chat.jsonl", "w") as chat, open(tmp_path / "prefs.jsonl", "w") as prefs:
        for i in range(40):
            w = WORDS[i % 30]
            user = {"role": "user", "content": f"say {w} twice"}
            chat.write(json.dumps({"messages": [user, {"role": "assistant", "content": f"{w} {w}"}]}) + "\n")
            prefs.write(json.dumps({"prompt": [user], "chosen": [{"role": "assistant", "content": f"{w} {w}"}],
                                    "rejected": [{"role": "assistant", "content": w}]}) + "\n")
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps({"text": f"say {w} twice: {w} {w}"}) + "\n"
                                                 for w in WORDS[:6]))
    (tmp_path / "eval_choices.jsonl").write_text("".join(json.dumps(
        {"question": f"say {w} twice", "choices": [f"{w} {w}", "no"], "answer": 0}) + "\n" for w in WORDS[:4]))
    runs = tmp_path / "runs"

    def ok(res):
        errors = [line for line in (res.stdout + res.stderr).splitlines() if "error" in line.lower()]
        assert res.returncode == 0, "\n".join(errors[:10]) + res.stdout[-2000:]
        return res

    ok(run_module("megalm.interop.hf", "--help"))  # the export command's module answers
    ok(subprocess.run([PYTHON, "-c", "from megalm.interop.hf import import_main; import sys; "
                       f"sys.exit(import_main(['--input', '{hf}', '--save', '{runs / 'llama31'}']))"],
                      cwd=ROOT, capture_output=True, text=True))
    m = ["--config", runs / "llama31" / "iter_0000000" / "config.yaml", "--seq-length", "128", "--micro-batch-size",
         "1", "--global-batch-size", "8", "--eval-iters", "0", "--log-interval", "2"]
    ok(torchrun(4, "megalm/pretrain.py", *m, "--pretrained-checkpoint", runs / "llama31", "--sft-data",
                tmp_path / "chat.jsonl", "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
                "--sequence-parallel", "--train-iters", "6", "--lr", "1e-3", "--lr-warmup-iters", "1", "--save",
                runs / "sft"))
    ok(torchrun(2, "megalm/pretrain.py", *m, "--pretrained-checkpoint", runs / "llama31", "--sft-data",
                tmp_path / "chat.jsonl", "--lora-rank", "4", "--lora-alpha", "8", "--lora-target-modules", "q_proj",
                "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "--zero-stage", "1",
                "--train-iters", "6", "--lr", "1e-2", "--save", runs / "lora"))
    res = ok(torchrun(2, "megalm/pretrain.py", *m, "--seq-length", "256", "--pretrained-checkpoint", runs / "sft",
                      "--dpo-data", tmp_path / "prefs.jsonl", "--dpo-beta", "0.1", "--lora-rank", "4",
                      "--tensor-model-parallel-size", "2", "--sequence-parallel", "--train-iters", "4", "--lr", "1e-2",
                      "--save", runs / "dpo"))
    assert "reference log-probabilities of 40 pairs computed (adapters off: the base model)" in res.stdout
    from megalm.interop.hf import export_hf

    export_hf(str(runs / "dpo"), str(runs / "hf-dpo"), merge_lora=True)  # the DPO adapters on the SFT model
    export_hf(str(runs / "sft"), str(runs / "hf-sft"))
    export_hf(str(runs / "lora"), str(runs / "hf-lora"), merge_lora=True)
    export_hf(str(runs / "lora"), str(runs / "peft-lora"), lora_format="peft")
    tokens = torch.tensor([[5, 20, 33, 7, 91, 44, 12]])
    with torch.no_grad():
        merged = transformers.AutoModelForCausalLM.from_pretrained(runs / "hf-lora").eval()(tokens).logits
        adapted = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(hf),
                                                 str(runs / "peft-lora")).eval()(tokens).logits
        for folder in ("hf-dpo", "hf-sft"):
            transformers.AutoModelForCausalLM.from_pretrained(runs / folder).eval()(tokens)
    assert (merged - adapted).abs().max() < 1e-4
    template = transformers.AutoTokenizer.from_pretrained(runs / "hf-lora").apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert template.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    for model, extra in ((runs / "hf-lora", ["--choices", tmp_path / "eval_choices.jsonl"]),
                         (hf, ["--peft", runs / "peft-lora"])):
        res = ok(subprocess.run([PYTHON, "scripts/lm_eval_local.py", "--model", model, "--apply-chat-template",
                                 "--data", tmp_path / "eval.jsonl", "--output", tmp_path / "eval", *extra],
                                cwd=ROOT, capture_output=True, text=True, timeout=600,
                                env=dict(os.environ, PYTHONUNBUFFERED="1")))
        results = json.loads(res.stdout[res.stdout.rindex("\n{\n"):])
        assert results["megalm_local_ppl"]["word_perplexity,none"] > 1.0
        if "--choices" in map(str, extra):
            assert 0.0 <= results["megalm_local_choice"]["acc,none"] <= 1.0
    with pytest.raises(Exception, match="holds LoRA adapters only"):
        export_hf(str(runs / "lora"), str(tmp_path / "x"))
