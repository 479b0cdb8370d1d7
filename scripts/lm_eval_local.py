"""Score an exported model with lm-eval (`pip install "lm-eval[hf]"`) on a local task, offline.

    python -m megalm.interop.hf ... (megalm-export-hf --load CKPT --output HF_DIR)
    python scripts/lm_eval_local.py --model HF_DIR --data docs.jsonl --output results/
    python scripts/lm_eval_local.py --model BASE_HF_DIR --peft PEFT_DIR --apply-chat-template --data ... --output ...

``--data`` is JSON lines with a "text" field (for example from megalm-build-corpus). The script writes an lm-eval
task definition for it (rolling log-likelihood: word and byte perplexity, bits per byte, like lm-eval's wikitext
task), then runs ``lm_eval --model hf`` on the exported directory with the Hugging Face hub switched off. With
``--choices FILE`` (JSON lines with "question", "choices", "answer" index) it adds a multiple-choice accuracy task.
"""
import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile

PPL_TASK = """task: megalm_local_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
should_decontaminate: false
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
metadata:
  version: 1.0
"""

CHOICE_TASK = """task: megalm_local_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
metadata:
  version: 1.0
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="directory written by megalm-export-hf")
    ap.add_argument("--data", required=True, help="JSON lines with a 'text' field")
    ap.add_argument("--choices", help="JSON lines with 'question', 'choices', 'answer' (optional)")
    ap.add_argument("--output", required=True, help="directory for lm-eval's results JSON")
    ap.add_argument("--limit", type=int, default=None, help="score only the first N documents")
    ap.add_argument("--batch-size", default="1")
    ap.add_argument("--peft", help="a PEFT adapter directory (megalm-export-hf --lora-format peft) to load onto "
                    "--model, the base exported on its own")
    ap.add_argument("--apply-chat-template", action="store_true", help="wrap each request in the model's chat "
                    "template (lm-eval's --apply_chat_template), as a chat model sees its input")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tasks:
        with open(os.path.join(tasks, "megalm_local_ppl.yaml"), "w") as fh:
            fh.write(PPL_TASK.format(data=os.path.abspath(args.data)))
        names = ["megalm_local_ppl"]
        if args.choices:
            with open(os.path.join(tasks, "megalm_local_choice.yaml"), "w") as fh:
                fh.write(CHOICE_TASK.format(data=os.path.abspath(args.choices)))
            names.append("megalm_local_choice")
        model_args = f"pretrained={os.path.abspath(args.model)},dtype=float32"
        if args.peft:
            model_args += f",peft={os.path.abspath(args.peft)}"
        cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", model_args, "--tasks", ",".join(names),
               "--include_path", tasks, "--device", "cpu", "--batch_size", args.batch_size,
               "--output_path", args.output]
        if args.limit:
            cmd += ["--limit", str(args.limit)]
        if args.apply_chat_template:
            cmd.append("--apply_chat_template")
        env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        res = subprocess.run(cmd, env=env)
    if res.returncode:
        return res.returncode
    found = sorted(glob.glob(os.path.join(args.output, "**", "results*.json"), recursive=True))
    if not found:
        print(f"lm_eval wrote no results under {args.output}", file=sys.stderr)
        return 1
    with open(found[-1]) as fh:
        results = json.load(fh)["results"]
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
