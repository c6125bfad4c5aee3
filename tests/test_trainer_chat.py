"""trainer.chat against transformers' apply_chat_template, and the assistant-only loss mask."""

from __future__ import annotations

import pytest

from tests.fixtures_hf import train_tokenizer
from trainer import chat
from trainer.config import RecipeError, TokenizerConfig
from trainer.tokenizer import load_tokenizer

# The templates as their model repositories ship them (tool-calling branches left out).
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim "
    "+ '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
QWEN25_CHATML = (
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "{%- else %}\n"
    "    {{- '<|im_start|>system\\nYou are Qwen, a helpful assistant.<|im_end|>\\n' }}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if not (message.role == 'system' and loop.first) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != "
    "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate "
    "user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant "
    "roles are supported!') }}{% endif %}{% endfor %}"
)
# (template, its end-of-turn token, whether it takes a system message)
TEMPLATES = {
    "llama3": (LLAMA3, "<|eot_id|>", True),
    "qwen2.5-chatml": (QWEN25_CHATML, "<|im_end|>", True),
    "mistral": (MISTRAL, "<|end_of_text|>", False),
}
SYSTEM = {"role": "system", "content": "You are terse."}
TURNS = [
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "It is 4.\nDone."},
    {"role": "user", "content": "And `x * 3` for x = 🙂?"},
    {"role": "assistant", "content": "def triple(x):\n    return x * 3"},
]


@pytest.fixture(scope="module", params=TEMPLATES)
def template_case(request, tmp_path_factory):
    template, end_of_turn, takes_system = TEMPLATES[request.param]
    directory = train_tokenizer(
        tmp_path_factory.mktemp(request.param), "bpe", end_of_turn, template
    )
    messages = ([SYSTEM] if takes_system else []) + TURNS
    return directory, messages, end_of_turn


def test_rendering_and_tokens_equal_apply_chat_template(template_case):
    from transformers import AutoTokenizer

    directory, messages, _ = template_case
    theirs = AutoTokenizer.from_pretrained(directory)
    ours = load_tokenizer(TokenizerConfig(path=str(directory)))
    template = chat.template_source(None, ours)  # the tokenizer's own
    for prompt in (False, True):
        assert chat.render(template, messages, ours.special_tokens, prompt) == (
            theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
        )
    tokens, _ = chat.tokenize_chat({"messages": messages}, ours, template)
    expected = theirs.apply_chat_template(messages, tokenize=True, return_dict=True)
    assert tokens == list(expected["input_ids"])


def test_loss_mask_is_exactly_assistant_content_and_end_of_turn(template_case):
    directory, messages, end_of_turn = template_case
    tok = load_tokenizer(TokenizerConfig(path=str(directory)))
    tokens, flags = chat.tokenize_chat({"messages": messages}, tok, chat.template_source(None, tok))
    runs, run = [], []
    for token, flag in zip([*tokens, None], [*flags, 0], strict=True):
        if flag:
            run.append(token)
        elif run:
            runs.append(tok.decode(run))
            run = []
    assert runs == [m["content"] + end_of_turn for m in messages if m["role"] == "assistant"]


def test_named_templates_and_the_tulu_fallback(tmp_path):
    plain = load_tokenizer(
        TokenizerConfig(path=str(train_tokenizer(tmp_path / "t", "bpe", chat_template=None)))
    )
    assert chat.template_source(None, plain) is None  # no template of its own: tulu
    assert chat.template_source("llama3", plain) == chat.JINJA_TEMPLATES["llama3"]
    messages = [SYSTEM, *TURNS]
    special = plain.special_tokens
    assert chat.render(chat.JINJA_TEMPLATES["llama3"], messages, special) == chat.render(
        LLAMA3, messages, special
    )
    assert chat.render(chat.JINJA_TEMPLATES["chatml"], messages, special) == chat.render(
        QWEN25_CHATML, messages, special
    )
    (tmp_path / "mine.jinja").write_text(MISTRAL)
    assert chat.template_source(str(tmp_path / "mine.jinja"), plain) == MISTRAL
    tokens, flags = chat.tokenize_chat({"messages": TURNS}, plain, None)
    learned = [t for t, f in zip(tokens, flags, strict=True) if f]
    assert (
        plain.decode(learned)
        == "It is 4.\nDone.<|eot_id|>def triple(x):\n    return x * 3<|eot_id|>"
    )


def test_named_templates_without_a_default_are_refused_as_transformers_refuses(tmp_path):
    from transformers import AutoTokenizer

    named = [{"name": "tool_use", "template": LLAMA3}, {"name": "rag", "template": MISTRAL}]
    directory = train_tokenizer(tmp_path / "t", "bpe", chat_template=named)
    tok = load_tokenizer(TokenizerConfig(path=str(directory)))
    with pytest.raises(ValueError, match="no default"):
        AutoTokenizer.from_pretrained(directory).apply_chat_template(TURNS, tokenize=False)
    with pytest.raises(RecipeError, match="named tool_use, rag and none named default"):
        chat.template_source(None, tok)
    assert chat.template_source("llama3", tok) == chat.JINJA_TEMPLATES["llama3"]

    with_default = [*named, {"name": "default", "template": QWEN25_CHATML}]
    directory = train_tokenizer(tmp_path / "d", "bpe", chat_template=with_default)
    assert chat.template_source(None, load_tokenizer(TokenizerConfig(path=str(directory)))) == (
        QWEN25_CHATML
    )


def test_templates_that_break_prefixes_or_raise_are_recipe_errors(tmp_path):
    tok = load_tokenizer(TokenizerConfig(path=str(train_tokenizer(tmp_path / "t", "bpe"))))
    count_first = "{{ messages | length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(RecipeError, match="differently from its prefixes"):
        chat.tokenize_chat({"messages": TURNS}, tok, count_first)
    with pytest.raises(RecipeError, match="roles must alternate"):
        chat.tokenize_chat({"messages": [TURNS[1], TURNS[1]]}, tok, MISTRAL)
    with pytest.raises(RecipeError, match="not a valid Jinja template"):
        chat.tokenize_chat({"messages": TURNS}, tok, "{% for %}")


# Llama 3.1's kind of branch on a tool call, Qwen3's on reasoning.
TOOLS_AND_REASONING = (
    "{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' }}"
    "{% if 'tool_calls' in m %}{{ 'TOOLS:' + m.tool_calls | tojson }}"
    "{% else %}{% if m.reasoning_content is defined %}"
    "{{ '<think>' + m.reasoning_content + '</think>' }}{% endif %}"
    "{{ m['content'] | trim }}{% endif %}{{ '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)


def test_messages_reach_the_template_as_apply_chat_template_passes_them(tmp_path):
    """Parquet gives every message every key of the column, None where it had none: the
    template saw `tool_calls: None` and rendered a tool call instead of the reply. And
    reasoning under `reasoning` or `thinking` reaches templates as reasoning_content."""
    from transformers import AutoTokenizer

    directory = train_tokenizer(tmp_path / "t", "bpe", "<|eot_id|>", TOOLS_AND_REASONING)
    theirs = AutoTokenizer.from_pretrained(directory)
    ours = load_tokenizer(TokenizerConfig(path=str(directory)))
    template = chat.template_source(None, ours)
    for messages in (
        [{"role": "user", "content": "2+2?", "tool_calls": None},
         {"role": "assistant", "content": "four", "tool_calls": None}],
        [{"role": "user", "content": "2+2?"},
         {"role": "assistant", "content": "four", "reasoning": "two and two"}],
    ):  # fmt: skip
        assert chat.render(template, messages, ours.special_tokens) == (
            theirs.apply_chat_template(messages, tokenize=False)
        )
        tokens, _ = chat.tokenize_chat({"messages": messages}, ours, template)
        expected = theirs.apply_chat_template(messages, tokenize=True, return_dict=True)
        assert tokens == list(expected["input_ids"])


def test_the_tulu_fallback_takes_none_as_no_content_and_refuses_what_is_not_text(tmp_path):
    tok = load_tokenizer(
        TokenizerConfig(path=str(train_tokenizer(tmp_path / "t", "bpe", chat_template=None)))
    )
    empty = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}]
    tokens, flags = chat.tokenize_chat({"messages": empty}, tok, None)
    assert "None" not in tok.decode([t for t, f in zip(tokens, flags, strict=True) if f])
    parts = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    with pytest.raises(RecipeError, match="a user message's content is a list, not text"):
        chat.tokenize_chat({"messages": parts}, tok, None)


def test_a_template_file_that_is_not_text_is_one_line(tmp_path):
    """It was a UnicodeDecodeError traceback."""
    tok = load_tokenizer(
        TokenizerConfig(path=str(train_tokenizer(tmp_path / "t", "bpe", chat_template=None)))
    )
    (tmp_path / "t.jinja").write_bytes(b"\xff\xfe{{ messages }}")
    with pytest.raises(RecipeError, match=r"t\.jinja cannot be read as a Jinja template"):
        chat.template_source(str(tmp_path / "t.jinja"), tok)


def test_a_reply_starting_with_a_byte_fallback_character_is_learned_whole():
    """sentencepiece gives the first byte pieces of 🙂 empty spans where it starts: only its
    last byte used to be learned, so the model never learned to begin a reply with it."""
    from tests.fixtures_trainer import REPO

    tok = load_tokenizer(TokenizerConfig(path=str(REPO / "recipes" / "data" / "tokenizer.model")))
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "🙂 ok"}]
    tokens, flags = chat.tokenize_chat({"messages": messages}, tok, chat.JINJA_TEMPLATES["chatml"])
    learned = [t for t, f in zip(tokens, flags, strict=True) if f]
    assert tok.decode(learned).startswith("🙂 ok")


def test_the_end_of_turn_token_is_the_special_token_that_ends_an_assistant_turn(tmp_path):
    """What the export adds to a chat model's stop tokens (trainer.generation): here the
    tokenizer's EOS is <|end_of_text|>, as a Llama 3 base model's."""
    from tests.fixtures_hf import OLMO2_TEMPLATE, SENTENCEPIECE

    directory = train_tokenizer(tmp_path / "t", "bpe", "<|end_of_text|>", None)
    tok = load_tokenizer(TokenizerConfig(path=str(directory)))
    plain_text_ends = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n\n{% endfor %}"
    needs_system = "{% if messages[0]['role'] != 'system' %}{{ raise_exception('no') }}{% endif %}"
    for template, expected in [
        (LLAMA3, "<|eot_id|>"),
        (QWEN25_CHATML, "<|im_end|>"),
        (MISTRAL, "<|end_of_text|>"),  # its EOS
        (None, "<|end_of_text|>"),  # tulu: replies end with EOS
        (plain_text_ends, None),  # no stop token: generation must not stop at "\n\n"
        (needs_system, None),  # says nothing about its ends
    ]:
        found = chat.end_of_turn_id(template, tok)
        assert found == (expected and tok.special_ids[expected]), template
    sentencepiece = load_tokenizer(TokenizerConfig(path=SENTENCEPIECE))
    assert chat.end_of_turn_id(OLMO2_TEMPLATE, sentencepiece) == sentencepiece.eos_id
