"""Chat templates against transformers: for tiny tokenizers carrying the real templates of Llama 3.1, Qwen3 and
Mistral (v3), megalm's ids equal ``apply_chat_template(..., tokenize=True)`` and its loss mask equals transformers'
``return_assistant_tokens_mask``: on a template with ``{% generation %}`` blocks (TRL's Qwen3 training template)
directly, and for the original templates, which have none, against the same template with blocks added around what
the assistant writes (a rendering checked to be identical), which is what megalm's turn-by-turn rule must find."""
import os

import pytest

from chat_data import FAMILIES, conversations, marked, template_text, tiny_tokenizer
from conftest import require
from megalm.data.chat_template import ChatTemplateError, find_templates, token_mask
from megalm.data.gpt_dataset import DatasetError
from megalm.data.sft import tokenize_examples
from megalm.data.tokenizers import HuggingFaceTokenizer


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    return {family: (tiny_tokenizer(root / family, family),
                     tiny_tokenizer(root / f"{family}-marked", family, marked(family, template_text(family))))
            for family in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_ids_and_assistant_mask_equal_transformers(tokenizers, family):
    transformers = require("transformers")
    plain, with_marks = tokenizers[family]
    theirs = transformers.AutoTokenizer.from_pretrained(plain)
    theirs_marked = transformers.AutoTokenizer.from_pretrained(with_marks)
    ours = HuggingFaceTokenizer(plain).chat_template()
    assert not ours.marks_generation
    for conversation in conversations(family):
        text = theirs.apply_chat_template(conversation, tokenize=False)
        assert theirs_marked.apply_chat_template(conversation, tokenize=False) == text  # the same rendering
        assert ours.render(conversation) == text
        ids = theirs.apply_chat_template(conversation, tokenize=True, return_dict=True)["input_ids"]
        expected = theirs_marked.apply_chat_template(conversation, tokenize=True, return_dict=True,
                                                     return_assistant_tokens_mask=True)
        got_ids, got_mask = ours.encode(conversation)
        assert got_ids == ids == expected["input_ids"]
        assert got_mask == expected["assistant_masks"], family
        assert 0 < sum(got_mask) < len(got_mask)
        # the system prompt carries no loss; every assistant turn does
        learned = theirs.decode([i for i, m in zip(ids, got_mask) if m])
        for message in conversation:
            content = message["content"].split("</think>")[-1].strip()
            assert (content in learned) == (message["role"] == "assistant"), (family, message, learned)
    # the same marks from megalm's own reading of the marked template (its {% generation %} blocks)
    marked_ours = HuggingFaceTokenizer(with_marks).chat_template()
    assert marked_ours.marks_generation
    for conversation in conversations(family):
        assert marked_ours.encode(conversation) == ours.encode(conversation)


def test_template_with_generation_blocks_equals_transformers(tmp_path):
    """TRL's Qwen3 training template marks the assistant's output itself (and renders differently from Qwen3's)."""
    transformers = require("transformers")
    trl_dir = os.path.join(os.path.dirname(require("trl").__file__), "chat_templates")
    with open(os.path.join(trl_dir, "qwen3_training.jinja")) as fh:
        source = fh.read()
    folder = tiny_tokenizer(tmp_path / "q", "qwen3", source)
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    ours = HuggingFaceTokenizer(folder).chat_template()
    assert ours.marks_generation
    for conversation in conversations("qwen3"):
        expected = theirs.apply_chat_template(conversation, tokenize=True, return_dict=True,
                                              return_assistant_tokens_mask=True)
        assert ours.encode(conversation) == (expected["input_ids"], expected["assistant_masks"])


def test_template_sources_and_choice(tmp_path, tokenizers):
    """chat_template.jinja over tokenizer_config.json, named templates, --chat-template as file, directory or name,
    and one clear error for a template the tokenizer does not have."""
    folder = tiny_tokenizer(tmp_path / "t", "llama3_1")
    tok = HuggingFaceTokenizer(folder)
    with open(os.path.join(folder, "chat_template.jinja"), "w") as fh:
        fh.write("{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}")
    assert find_templates(folder)[0]["default"].startswith("{% for m in messages %}")
    conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}]
    assert tok.chat_template().render(conversation) == "[user]hi[assistant]yes"
    qwen_dir = tokenizers["qwen3"][0]
    assert tok.chat_template(qwen_dir).render(conversation).startswith("<|im_start|>user\nhi")
    jinja = tmp_path / "mine.jinja"
    jinja.write_text("{{ bos_token }}{% for m in messages %}{{ m.content }};{% endfor %}")
    assert tok.chat_template(str(jinja)).render(conversation) == "<|begin_of_text|>hi;yes;"
    with pytest.raises(ChatTemplateError, match="--chat-template tool_use: not a file or directory, and not a "
                                                "template of .* \\(it has: default\\)"):
        tok.chat_template("tool_use")
    bare = tiny_tokenizer(tmp_path / "bare", "mistral_v3", template="")
    os.remove(os.path.join(bare, "tokenizer_config.json"))
    with pytest.raises(ChatTemplateError, match="has no chat template .*give --chat-template"):
        HuggingFaceTokenizer(bare).chat_template()


def test_bad_conversations_name_the_line(tmp_path, tokenizers):
    tok = HuggingFaceTokenizer(tokenizers["llama3_1"][0])
    template = tok.chat_template()
    bad = tmp_path / "bad.jsonl"
    ok = '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n'
    cases = [('{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]}',
              "no assistant turn to learn from"),
             ('{"messages": [{"content": "q"}]}', "'messages' must be a list of objects, each with a 'role'"),
             ('{"conversations": [{"from": "alien", "value": "q"}]}', "unknown speaker 'alien'"),
             ('{"text": "q"}', "not an example of any --sft-format"),
             ('{"instruction": "q", "output": 3}', "'output' must be a string")]
    for line, message in cases:
        bad.write_text(ok + line + "\n")
        with pytest.raises(DatasetError, match=f"{bad}:2: .*{message}"):
            tokenize_examples(str(bad), tok, "auto", template)
    bad.write_text(ok)
    with pytest.raises(DatasetError, match=f"{bad}:1: a conversation needs a chat template"):
        tokenize_examples(str(bad), tok, "auto", None)
    mistral = HuggingFaceTokenizer(tokenizers["mistral_v3"][0])
    bad.write_text('{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, '
                   '{"role": "assistant", "content": "c"}]}\n')
    with pytest.raises(DatasetError, match=f"{bad}:1: .*refuses this conversation: After the optional system "
                                           "message, conversation roles must alternate"):
        tokenize_examples(str(bad), mistral, "messages", mistral.chat_template())


def test_token_mask_rule():
    """A token carries loss when its characters overlap an assistant span (transformers' rule)."""
    offsets = [(0, 3), (3, 5), (5, 9), (9, 9), (9, 12)]
    assert token_mask(offsets, [(4, 6)]) == [0, 1, 1, 0, 0]
    assert token_mask(offsets, [(0, 3), (9, 12)]) == [1, 0, 0, 0, 1]
