"""Chat conversations as tokens and loss flags, rendered with the model's own chat template.

The template is `data.chat_template` when the recipe names one (`tulu`, `llama3`, `chatml` or
a Jinja FILE), else the tokenizer's own `chat_template`, else `tulu` (the trainer's original
`<|user|>` format). Jinja templates are rendered as transformers' `apply_chat_template` renders
them (the same sandboxed environment, filters and variables: `messages`,
`add_generation_prompt`, `bos_token`, `eos_token`, ...) and the whole text is tokenised once,
so the tokens equal `apply_chat_template(messages, tokenize=True)`.

Only assistant turns are learned. Where each one lies in the text is found by rendering
prefixes, never by searching for strings: assistant turn i is the text that rendering
messages[:i + 1] adds to rendering messages[:i] with the generation prompt, trailing whitespace
after its end-of-turn token excluded. A token is learned when it overlaps such a span.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache

from trainer import io
from trainer.config import CHAT_TEMPLATE_NAMES, RecipeError
from trainer.tokenizer import Tokenizer, bos, eos

TULU_HEADERS = {"system": "<|system|>\n", "user": "<|user|>\n", "assistant": "<|assistant|>\n"}
# Meta's Llama 3 template and Qwen's ChatML, without their tool-calling branches.
JINJA_TEMPLATES = {
    "llama3": (
        "{% for message in messages %}{% set content = '<|start_header_id|>' + message['role'] + "
        "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' %}"
        "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
        "{{ content }}{% endfor %}{% if add_generation_prompt %}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
        "message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
}
assert set(CHAT_TEMPLATE_NAMES) == {"tulu", *JINJA_TEMPLATES}

Spans = list[tuple[int, int]]


def template_source(name: str | None, tok: Tokenizer) -> str | None:
    """The Jinja source that `data.chat_template: name` selects for `tok`; None means tulu."""
    if name is None:
        if tok.chat_template is None and tok.chat_template_names:
            # transformers refuses to pick one too; tulu would train on text no one serves
            names = ", ".join(tok.chat_template_names)
            raise RecipeError(
                f"data.chat_template: the tokenizer has chat templates named {names} and none "
                "named default; set data.chat_template to a Jinja file holding the one to use, "
                "or to tulu, llama3 or chatml"
            )
        return tok.chat_template
    if name == "tulu":
        return None
    return JINJA_TEMPLATES.get(name) or _read_template(name)


@lru_cache(maxsize=8)
def _read_template(path: str) -> str:
    try:
        return io.read_text(path)
    except (OSError, UnicodeDecodeError) as e:  # a directory, unreadable, not text
        reason = getattr(e, "strerror", None) or type(e).__name__
        raise RecipeError(
            f"data.chat_template: {path} cannot be read as a Jinja template ({reason}); name "
            "a template file, or tulu, llama3 or chatml"
        ) from None


def tokenize_chat(
    record: object, tok: Tokenizer, template: str | None
) -> tuple[list[int], list[int]]:
    """(tokens, loss flags) of one `{"messages": [...]}` record under Jinja `template` (None:
    tulu); flags are 1 exactly on assistant content and its end-of-turn token."""
    messages = record.get("messages") if isinstance(record, dict) else None
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise RecipeError("data.format chat: records need a 'messages' list of {role, content}")
    return tokenize_messages(messages, tok, template)


def tokenize_messages(
    messages: list[dict], tok: Tokenizer, template: str | None, last_turn_only: bool = False
) -> tuple[list[int], list[int]]:
    """(tokens, loss flags) of a conversation; with `last_turn_only`, only its final assistant
    turn is flagged (a preference pair's response; earlier turns are prompt)."""
    if template is None:
        return _tokenize_tulu(messages, tok, last_turn_only)
    text, spans = render_with_spans(template, messages, tok.special_tokens)
    spans = spans[-1:] if last_turn_only else spans
    ids, offsets = tok.encode_with_offsets(text)
    # A token is learned when it overlaps a turn; sentencepiece gives the byte pieces of one
    # character (🙂 as <0xF0>...) empty spans where it starts: those count by where they are.
    flags = [int(any(a < end and (b > start or a == b >= start) for start, end in spans))
             for a, b in offsets]  # fmt: skip
    return ids, flags


def render(template: str, messages: list[dict], special_tokens: dict[str, str],
           add_generation_prompt: bool = False) -> str:  # fmt: skip
    """The text of `messages` as transformers' apply_chat_template renders it."""
    try:
        return _compile(template).render(
            messages=[_as_transformers_passes_it(m) for m in messages],
            tools=None,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **special_tokens,
        )
    except Exception as e:  # jinja2's TemplateError, and what templates raise on bad input
        raise RecipeError(f"data.chat_template: rendering a conversation failed: {e}") from e


# Names a message's reasoning comes under; templates read the first (transformers fills it
# from the others, and `thinking` for gpt-oss templates).
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _as_transformers_passes_it(message: dict) -> dict:
    """A message as apply_chat_template hands it to a template: keys whose value is None
    dropped (Parquet and Arrow give every message every key of the column, None where it had
    none: `tool_calls: None` would render as a tool call), reasoning under every name."""
    message = {key: value for key, value in message.items() if value is not None}
    reasoning = next((message[k] for k in REASONING_FIELDS if k in message), None)
    if reasoning is not None:
        message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
    return message


def render_with_spans(
    template: str, messages: list[dict], special_tokens: dict[str, str]
) -> tuple[str, Spans]:
    """The rendered conversation and the character span of each assistant turn in it."""
    text = render(template, messages, special_tokens)
    spans = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        before = render(template, messages[:i], special_tokens, add_generation_prompt=True)
        through = render(template, messages[: i + 1], special_tokens)
        if not (through.startswith(before) and text.startswith(through)):
            raise RecipeError(
                "data.chat_template: this template renders a conversation's turns differently "
                "from its prefixes, so assistant turns cannot be located; name another template"
            )
        spans.append((len(before), max(len(before), len(through.rstrip()))))
    return text, spans


# A conversation whose rendering shows how a template ends an assistant turn.
PROBE = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]


def end_of_turn_id(template: str | None, tok: Tokenizer) -> int | None:
    """The id of the special token that ends an assistant turn under Jinja `template` (None:
    tulu, whose turns end with EOS): Llama 3's <|eot_id|>, ChatML's <|im_end|>. None when a
    turn ends with ordinary text, at which generation must not stop, or when the template
    will not render a plain user/assistant exchange (it then says nothing about its ends)."""
    if template is None:
        return tok.eos_id
    try:
        text, spans = render_with_spans(template, PROBE, tok.special_tokens)
    except RecipeError:
        return None
    turn = text[slice(*spans[-1])]
    specials = tok.special_ids
    ends = [token for token in specials if turn.endswith(token)]
    return specials[max(ends, key=len)] if ends else None


@lru_cache(maxsize=8)
def _compile(template: str):
    """The template in the environment transformers renders chat templates in."""
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask markers) renders
        its body unchanged: spans come from rendering prefixes here."""

        tags = frozenset({"generation"})

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body, lineno=lineno)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise RecipeError(f"data.chat_template: not a valid Jinja template ({e})") from e


def tulu_template(tok: Tokenizer) -> str:
    """A Jinja template that renders a conversation as the text `_tokenize_tulu` trains on
    (BOS and EOS as the recipe adds them), with `<|assistant|>\\n` as its generation prompt: what
    an export of a tulu run gives `apply_chat_template`."""
    start = "{{ bos_token }}" if bos(tok) else ""
    reply_end = "{{ eos_token }}" if eos(tok) else ""
    return (
        start + "{% for message in messages %}"
        "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
        "{{ raise_exception('unknown role ' + message['role'] + '; use system, user or assistant') }}"
        "{% endif %}{{ '<|' + message['role'] + '|>\\n' }}{{ message['content'] or '' }}"
        "{% if message['role'] == 'assistant' %}" + reply_end + "{% else %}{{ '\\n' }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
    )


def _tokenize_tulu(
    messages: list[dict], tok: Tokenizer, last_turn_only: bool = False
) -> tuple[list[int], list[int]]:
    """The trainer's original format: `<|role|>\\n` headers, assistant turns ending in EOS."""
    tokens, flags = bos(tok), [0] * len(bos(tok))
    last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=-1)
    for i, message in enumerate(messages):
        role = message.get("role")
        if role not in TULU_HEADERS:
            raise RecipeError(
                f"data.format chat: unknown role {role!r}; use system, user or assistant"
            )
        content = message.get("content")
        if not isinstance(content, str | None):
            raise RecipeError(
                f"data.format chat: a {role} message's content is a {type(content).__name__}, "
                "not text; this format takes text only (name a data.chat_template for more)"
            )
        header = tok.encode(TULU_HEADERS[role])
        body = tok.encode(content or "")
        body += eos(tok) if role == "assistant" else tok.encode("\n")
        learn = int(role == "assistant" and (i == last or not last_turn_only))
        tokens += header + body
        flags += [0] * len(header) + [learn] * len(body)
    return tokens, flags
