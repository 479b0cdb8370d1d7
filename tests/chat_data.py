"""Tiny tokenizers with real models' chat templates (tests/data/chat_templates), built offline: a byte-level (or,
for Mistral, Metaspace) BPE trained on a few sentences, the family's special tokens added as such, and a
tokenizer_config.json with its bos/eos and the template, which both transformers and megalm load."""
import json
import os

TEMPLATES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "chat_templates")

FAMILIES = {
    "llama3_1": {"specials": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                              "<|eot_id|>", "<|eom_id|>", "<|python_tag|>"],
                 "bos": "<|begin_of_text|>", "eos": "<|eot_id|>", "metaspace": False},
    "qwen3": {"specials": ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<tool_call>",
                           "</tool_call>", "<tool_response>", "</tool_response>"],
              "bos": None, "eos": "<|im_end|>", "pad": "<|endoftext|>", "metaspace": False},
    "mistral_v3": {"specials": ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]",
                                "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]"],
                   "bos": "<s>", "eos": "</s>", "unk": "<unk>", "metaspace": True},
}

WORDS = ("the a an is are was what who where why how many much blue sky sun moon paris france capital city river "
         "answer question think reason step first then finally yes no sure here you i we they it helpful assistant "
         "system user model please tell me about explain short long list reverse alpha beta gamma delta one two "
         "three four five red green good bad better best").split()


def corpus(n: int = 400):
    import random

    rng = random.Random(0)
    for _ in range(n):
        yield " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 14))).capitalize() + rng.choice(".?!,")


def template_text(family: str) -> str:
    with open(os.path.join(TEMPLATES, family + ".jinja"), encoding="utf-8") as fh:
        return fh.read()


def tiny_tokenizer(folder, family: str, template: str = None, vocab_size: int = 420) -> str:
    """A tokenizer directory for ``family`` (``FAMILIES``) with its chat template (or ``template``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    spec = FAMILIES[family]
    folder = str(folder)
    os.makedirs(folder, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token=spec.get("unk")))
    if spec["metaspace"]:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
        tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
        alphabet = sorted(set("".join(WORDS) + "".join(WORDS).upper() + ".,?!:;'\"()[]{}<>_-/0123456789\u2581\n"))
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=spec["specials"], initial_alphabet=alphabet,
                                  show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    if spec["bos"]:  # as the real ones: a text gets BOS unless special tokens are turned off
        bos = spec["bos"]
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, tok.token_to_id(bos))])
    tok.save(os.path.join(folder, "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 4096,
              "chat_template": template if template is not None else template_text(family),
              "eos_token": spec["eos"], "bos_token": spec["bos"]}
    for key in ("pad", "unk"):
        if spec.get(key):
            config[f"{key}_token"] = spec[key]
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as fh:
        json.dump(config, fh, indent=1)
    return folder


def conversations(family: str):
    """Multi-turn conversations with a system prompt (and, for Qwen3, reasoning in assistant turns)."""
    think = family == "qwen3"
    first = "<think>\nThe capital of France is Paris.\n</think>\n\nParis." if think else "  Paris.  "
    last = "<think>\nCount them: one, two, three.\n</think>\n\nThree." if think else "Three."
    return [
        [{"role": "system", "content": "You are a helpful assistant."},
         {"role": "user", "content": "What is the capital of France?"},
         {"role": "assistant", "content": first},
         {"role": "user", "content": "How many words in: alpha beta gamma?"},
         {"role": "assistant", "content": last}],
        [{"role": "system", "content": "Answer short."},
         {"role": "user", "content": "Tell me about the sky."},
         {"role": "assistant", "content": "It is blue, then red."},
         {"role": "user", "content": "Why?"},
         {"role": "assistant", "content": "The sun."},
         {"role": "user", "content": "And the moon?"},
         {"role": "assistant", "content": "It is good."}],
    ]


def marked(family: str, template: str) -> str:
    """``template`` with ``{% generation %}`` around what the assistant writes after the generation prompt (its
    text and what closes its turn): the same rendering, and transformers' own mask of the assistant's tokens."""
    if family == "llama3_1":
        line = ("{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim "
                "+ '<|eot_id|>' }}")
        assert line in template
        return template.replace(line, (
            "{%- if message.role == 'assistant' %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
            "{%- generation %}{{- message['content'] | trim + '<|eot_id|>' }}{%- endgeneration %}{%- else %}"
            + line + "{%- endif %}"))
    if family == "mistral_v3":
        line = '{{- " " + message["content"]|trim + eos_token}}'
        assert line in template
        return template.replace(line, '{{- " " }}{%- generation %}{{- message["content"]|trim + eos_token}}'
                                      '{%- endgeneration %}')
    branch = "        {%- if loop.index0 > ns.last_query_index %}"
    close = "        {{- '<|im_end|>\\n' }}\n    {%- elif message.role == \"tool\" %}"
    assert template.count(branch) == 1 and template.count(close) == 1
    out = template.replace(branch, "        {{- '<|im_start|>' + message.role + '\\n' }}{%- generation %}\n" + branch)
    out = out.replace("'<|im_start|>' + message.role + '\\n<think>\\n'", "'<think>\\n'")
    out = out.replace("{{- '<|im_start|>' + message.role + '\\n' + content }}", "{{- content }}")
    return out.replace(close, close.replace("\n    {%- elif", "\n        {%- endgeneration %}\n    {%- elif"))
