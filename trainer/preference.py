"""Preference pairs (`data.format: preference`): one record becomes a chosen and a rejected
sequence that share its prompt, as tokens and loss flags, or a counted skip.

Records follow TRL's conventions, `prompt` + `chosen` + `rejected`:

- all three strings: BOS + prompt, then the response + EOS (as `prompt_completion`);
- `prompt` a list of messages, `chosen`/`rejected` the assistant message(s) that follow it;
- `chosen`/`rejected` whole conversations (UltraFeedback-binarized): the prompt is every
  message before the last, which must be an assistant turn; both must share it exactly.
  `prompt` may then be left out (a string `prompt` beside them, UltraFeedback's copy of the
  first user turn, is not used; a list must equal the shared turns).

Conversations are rendered with the chat template rules of `data.format: chat`; only the final
assistant turn is learned (flag 1), so only response tokens count in the log-probabilities.

Length rule: a pair goes whole into one packed row, its two sequences side by side in at most
`seq_len` tokens (each with its own copy of the prompt, as two segments). A pair that does not
fit first loses prompt tokens from the start (the end, next to the response, is kept), each
prompt keeping at least a quarter of seq_len; then the longer response loses
tokens from its end until both fit; the pairs it cut are counted (the cache summary reports
them). A response longer than `seq_len` on its own, an empty response ("", or a final message
without content: with EOS added it would train on EOS alone) and a pair whose two sequences
are identical are skipped and counted (the cache summary reports them); a record that is not
a pair is an error naming it and the fix.

An optional number `margin` (TRL's RewardTrainer convention: how much better chosen is) goes
with the pair into its packed row; the reward model's loss subtracts it (trainer.reward).
"""

from __future__ import annotations

import math

from trainer import chat
from trainer.config import DataConfig, RecipeError
from trainer.tokenizer import Tokenizer, bos, eos

Sequence = tuple[list[int], list[int]]  # tokens, loss flags
SKIP_REASONS = {
    "identical": "chosen == rejected",
    "too_long": "a response longer than train.seq_len",
    "empty": "an empty response",
}


class Skipped(Exception):
    """A record that is a well-formed pair but cannot train; `reason` is a SKIP_REASONS key."""

    def __init__(self, reason: str):
        super().__init__(SKIP_REASONS[reason])
        self.reason = reason


def tokenize_pair(
    record: object, tok: Tokenizer, cfg: DataConfig, budget: int
) -> tuple[tuple[Sequence, Sequence], bool]:
    """The (chosen, rejected) sequences of one record, fitted into `budget` tokens together
    (train.seq_len) by the length rule, and whether that rule cut them; raises Skipped or
    RecipeError."""
    whole = render_pair(record, tok, cfg)
    (pc, rc, fc), (pr, rr, fr) = whole
    said = [_says_something(record[name]) for name in ("chosen", "rejected")]
    if not all(said) or not any(fc) or not any(fr):
        raise Skipped("empty")
    if pc + rc == pr + rr:
        raise Skipped("identical")
    if max(len(rc), len(rr)) > budget:
        raise Skipped("too_long")
    chosen, rejected = _fit(*whole, budget)
    return (_sequence(*chosen), _sequence(*rejected)), [chosen, rejected] != whole


def _says_something(response: str | list[dict]) -> bool:
    """Whether a response has content: not "", nor a final message with nothing but its role
    (an empty content). Either trains on the EOS or end-of-turn token alone, which TRL does
    (it appends EOS to ""); that teaches only to stop at once, so such a pair is skipped."""
    if isinstance(response, str):
        return response != ""
    return any(value for key, value in response[-1].items() if key != "role")


def render_pair(record: object, tok: Tokenizer, cfg: DataConfig) -> list[tuple]:
    """The record's chosen and rejected sides, whole, as (prompt ids, response ids, response
    loss flags) each; raises RecipeError for a record that is not a pair."""
    if not isinstance(record, dict):
        raise RecipeError(f"data.format preference: a record is a JSON object, not {record!r:.40}")
    for name in ("chosen", "rejected"):
        if name not in record:
            raise RecipeError(
                f"data.format preference: the record has no {name!r}; every record needs "
                "'chosen' and 'rejected' (and 'prompt' unless they are whole conversations)"
            )
    chosen, rejected = record["chosen"], record["rejected"]
    if isinstance(chosen, str) and isinstance(rejected, str):
        prompt = record.get("prompt")
        if not isinstance(prompt, str):
            raise RecipeError(
                "data.format preference: string 'chosen'/'rejected' need a string 'prompt'"
            )
        pair = _string_pair(prompt, (chosen, rejected), tok)
    elif isinstance(chosen, list) and isinstance(rejected, list):
        template = chat.template_source(cfg.chat_template, tok)
        pair = [_conversation(c, tok, template) for c in _conversations(record)]
    else:
        raise RecipeError(
            "data.format preference: 'chosen' and 'rejected' must both be strings or both be "
            "lists of chat messages"
        )
    return pair


def _string_pair(prompt: str, responses: tuple[str, str], tok: Tokenizer) -> list[tuple]:
    """Both sides as TRL's DPO tokenises them: prompt + response whole, the response starting
    where those ids and the prompt's own first differ on either side (apart, a
    sentencepiece-style tokenizer gives a response starting with a space a lone word start),
    EOS appended unless the response's ids end with it already."""
    prompt_ids = tok.encode(prompt)
    wholes = [tok.encode(prompt + response) for response in responses]
    shared = min(_common_prefix(prompt_ids, whole) for whole in wholes)
    pair = []
    for whole in wholes:
        ids = whole[shared:]
        ids += eos(tok) if ids[-1:] != eos(tok) else []
        pair.append((bos(tok) + prompt_ids[:shared], ids, [1] * len(ids)))
    return pair


def _common_prefix(a: list[int], b: list[int]) -> int:
    pairs = zip(a, b, strict=False)  # the shorter one's length at most
    return next((i for i, (x, y) in enumerate(pairs) if x != y), min(len(a), len(b)))


def margin(record: dict) -> float:
    """The record's `margin` (0 without one); anything but a finite number is a RecipeError."""
    value = record.get("margin", 0.0)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise RecipeError(
            f"data.format preference: 'margin' must be a finite number, got {value!r:.40}; "
            "fix it or drop the field"
        )
    return float(value)


def _conversations(record: dict) -> tuple[list[dict], list[dict]]:
    """The chosen and rejected conversations of a chat record, checked to share their prompt."""
    chosen, rejected, prompt = record["chosen"], record["rejected"], record.get("prompt")
    for name, messages in (("chosen", chosen), ("rejected", rejected)):
        if not messages or not all(isinstance(m, dict) and "role" in m for m in messages):
            raise RecipeError(
                f"data.format preference: {name!r} must be a non-empty list of "
                "{role, content} messages"
            )
        if messages[-1]["role"] != "assistant":
            raise RecipeError(
                f"data.format preference: {name!r} must end with an assistant message (the response)"
            )
    whole = any(m["role"] != "assistant" for m in chosen + rejected)
    if not whole:  # explicit prompt: the responses follow record["prompt"]
        if not isinstance(prompt, list) or not prompt:
            raise RecipeError(
                "data.format preference: assistant-only 'chosen'/'rejected' need 'prompt' as a "
                "list of messages (or give whole conversations in 'chosen'/'rejected')"
            )
        if len(chosen) != 1 or len(rejected) != 1:  # else the pair would not share its prompt
            raise RecipeError(
                "data.format preference: with 'prompt' messages, 'chosen' and 'rejected' are one "
                "assistant message each (the response); give whole conversations in "
                "'chosen'/'rejected' instead"
            )
        return prompt + chosen, prompt + rejected
    if chosen[:-1] != rejected[:-1]:
        raise RecipeError(
            "data.format preference: 'chosen' and 'rejected' have different prompts (the turns "
            "before the final assistant message differ); a pair must share its prompt"
        )
    if isinstance(prompt, list) and prompt != chosen[:-1]:
        raise RecipeError(
            "data.format preference: 'prompt' differs from the turns 'chosen' and 'rejected' "
            "share; drop 'prompt' or make it those turns"
        )
    return chosen, rejected


def _conversation(
    messages: list[dict], tok: Tokenizer, template: str | None
) -> tuple[list[int], list[int], list[int]]:
    """(prompt tokens, response tokens, response flags): the response starts at the first token
    of the final assistant turn; tokens after it that the template adds keep flag 0."""
    tokens, flags = chat.tokenize_messages(messages, tok, template, last_turn_only=True)
    start = flags.index(1) if 1 in flags else len(tokens)
    return tokens[:start], tokens[start:], flags[start:]


def _fit(chosen: tuple, rejected: tuple, budget: int) -> tuple[tuple, tuple]:
    """Both (prompt, response, flags) cut by the length rule to fit `budget` tokens together."""
    (pc, rc, fc), (pr, rr, fr) = chosen, rejected
    over = len(pc) + len(rc) + len(pr) + len(rr) - budget
    if over <= 0:
        return chosen, rejected
    floor = budget // 4
    keep_c = max(min(len(pc), floor), len(pc) - (over + 1) // 2)
    keep_r = max(min(len(pr), floor), len(pr) - (over + 1) // 2)
    pc, pr = pc[len(pc) - keep_c :], pr[len(pr) - keep_r :]
    room = budget - len(pc) - len(pr)
    if len(rc) + len(rr) > room:  # the prompts take at most half: room >= budget / 2
        half = room // 2
        cap_c = len(rc) if len(rc) <= half else max(half, room - len(rr))
        cap_r = room - cap_c
        rc, fc, rr, fr = rc[:cap_c], fc[:cap_c], rr[:cap_r], fr[:cap_r]
    return (pc, rc, fc), (pr, rr, fr)


def _sequence(prompt: list[int], response: list[int], flags: list[int]) -> Sequence:
    return prompt + response, [0] * len(prompt) + flags
