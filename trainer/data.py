"""Rendering records into tokens and loss flags, and packing them into fixed-length rows.

Every row is `row_len = seq_len + 1` int32 tokens, then as many uint16 segment ids
(0 = padding), then as many uint8 loss flags (1 = this token is a training target), and in
preference rows as many float32 margins (a pair's `margin` on the tokens of its chosen
sequence, 0 elsewhere: the reward model's Bradley-Terry margin); inputs are row[:-1], targets
row[1:]. Plain text is concatenated and chunked (documents may continue into
the next row, under a new segment id); chat and prompt/completion examples are never split
(truncated if too long) and rows are padded instead. A preference pair's two sequences go into
one row as consecutive segments (2k - 1 chosen, 2k rejected for the row's k-th pair), and
preference rows leave their last token as padding. trainer.cache stores the rows, and
trainer.mixture picks the rows of each global batch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from trainer import chat, io, preference, tokenizer
from trainer.config import CHAT_TEMPLATE_NAMES, DataConfig, RecipeError, TokenizerConfig
from trainer.tokenizer import Tokenizer, bos, eos


def tokenize(record: object, tok: Tokenizer, cfg: DataConfig) -> tuple[list[int], list[int]]:
    """(tokens, loss flags) of one example; flags are 1 on tokens the model should learn to emit."""
    if cfg.format == "text":
        text = record if isinstance(record, str) else _field(record, cfg.text_field)
        tokens = bos(tok) + tok.encode(text) + eos(tok)
        return tokens, [1] * len(tokens)
    if cfg.format == "prompt_completion":
        # Tokenised whole, as TRL's SFT does: apart, a sentencepiece-style tokenizer gives the
        # completion a word start of its own ("Answer:" "▁four" for "Answer:four"). A token
        # is learned when it reaches into the completion.
        prompt, completion = _prompt_completion(record)
        ids, offsets = tok.encode_with_offsets(prompt + completion)
        learned = [int(end > len(prompt) or start >= len(prompt)) for start, end in offsets]
        tokens = bos(tok) + ids + eos(tok)
        return tokens, [0] * len(bos(tok)) + learned + [1] * len(eos(tok))
    return chat.tokenize_chat(record, tok, chat.template_source(cfg.chat_template, tok))


def sequences(
    record: object, tok: Tokenizer, cfg: DataConfig, row_len: int
) -> tuple[list[tuple[list[int], list[int]]], bool]:
    """The (tokens, flags) sequences of one record that go into one row together: one example,
    or a preference pair's chosen and rejected (trainer.preference; it may raise Skipped); and
    whether the record is cut to fit (an example longer than a row, which the packer cuts; a
    pair the length rule cut). Text is chunked, never cut."""
    if cfg.format == "preference":
        pair, cut = preference.tokenize_pair(record, tok, cfg, row_len - 1)
        return list(pair), cut
    example = tokenize(record, tok, cfg)
    return [example], not _chunked(cfg) and len(example[0]) > row_len


def _chunked(cfg: DataConfig) -> bool:
    """Whether examples are concatenated and chunked into rows (text) rather than kept whole."""
    return cfg.format == "text"


def _field(record: object, name: str) -> str:
    if not isinstance(record, dict) or not isinstance(record.get(name), str):
        raise RecipeError(
            f"data.text_field: a record has no string field {name!r}; set data.text_field"
        )
    return record[name]


def _prompt_completion(record: object) -> tuple[str, str]:
    if isinstance(record, dict) and "prompt" in record and "completion" in record:
        return _text(record, "prompt"), _text(record, "completion")
    if isinstance(record, dict) and "instruction" in record and "output" in record:
        extra = f"\n\n{_text(record, 'input')}" if record.get("input") else ""
        return f"{_text(record, 'instruction')}{extra}\n\n", _text(record, "output")
    raise RecipeError(
        "data.format prompt_completion: records need prompt+completion or instruction(+input)+output"
    )


def _text(record: dict, field: str) -> str:
    """A prompt_completion field, which must be text (or a number): str() of a list of
    messages, or of None, would train on its Python repr."""
    value = record[field]
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):  # an answer: 4
        return str(value)
    hint = " (messages: use data.format chat)" if isinstance(value, list) else ""
    raise RecipeError(
        f"data.format prompt_completion: '{field}' is a {type(value).__name__}, not text{hint}"
    )


@dataclass(frozen=True)
class Packed:
    tokens: np.ndarray  # [rows, row_len] int32
    segments: np.ndarray  # [rows, row_len] uint16, 0 = padding
    flags: np.ndarray  # [rows, row_len] uint8
    margins: np.ndarray | None = None  # [rows, row_len] float32, preference rows only

    def to_bytes(self) -> bytes:
        """The rows in the cache's layout: per row, the tokens, then segments, then flags (then
        margins)."""
        columns = [self.tokens.view(np.uint8), self.segments.view(np.uint8), self.flags]
        if self.margins is not None:
            columns.append(self.margins.view(np.uint8))
        return np.concatenate(columns, axis=1).tobytes()

    @staticmethod
    def from_bytes(buf: np.ndarray, row_len: int) -> Packed:
        """Rows from a [rows, row_bytes(row_len, margins)] uint8 array in the cache's layout."""
        n = row_len
        margins = buf.shape[1] == row_bytes(row_len, margins=True)
        return Packed(
            buf[:, : 4 * n].copy().view(np.int32),
            buf[:, 4 * n : 6 * n].copy().view(np.uint16),
            buf[:, 6 * n : 7 * n].copy(),
            buf[:, 7 * n :].copy().view(np.float32) if margins else None,
        )


class Packer:
    """Packs examples into rows of `row_len` as they come, with per-row segment ids from 1.

    Text (`split_documents`) is concatenated and chunked, a document continuing into the next
    row under a new segment id; other examples are never split (truncated if too long) and a
    row is padded instead. `take()` hands over the rows finished so far, so a caller holds
    only one row in progress plus what it has not taken.
    """

    def __init__(
        self, row_len: int, split_documents: bool, fill: int | None = None, margins: bool = False
    ):
        """`fill`: tokens a row of sequences added together may hold (default `row_len`);
        `margins`: rows carry the margins column (preference rows)."""
        self.row_len, self.split_documents = row_len, split_documents
        self.fill = fill or row_len
        self.dtypes = ROW_DTYPES + (MARGIN_DTYPE,) * margins
        self.tokens: list[int] = []
        self.segments: list[int] = []
        self.flags: list[int] = []
        self.margins: list[float] = []
        self.finished: list[tuple[np.ndarray, ...]] = []

    def add(self, ex_tokens: list[int], ex_flags: list[int]) -> None:
        if not self.split_documents:
            ex_tokens, ex_flags = ex_tokens[: self.row_len], ex_flags[: self.row_len]
            if len(self.tokens) + len(ex_tokens) > self.row_len:
                self._close_row()
            self._extend(ex_tokens, ex_flags)
            return
        start = 0
        while start < len(ex_tokens):
            take = min(self.row_len - len(self.tokens), len(ex_tokens) - start)
            self._extend(ex_tokens[start : start + take], ex_flags[start : start + take])
            start += take
            if len(self.tokens) == self.row_len:
                self._close_row()

    def add_together(
        self, sequences: list[tuple[list[int], list[int]]], margin: float = 0.0
    ) -> None:
        """Sequences that share one row, each as its own segment, in order (a preference pair:
        chosen on an odd segment id, rejected on the next, the pair's `margin` on the chosen
        one's tokens); together at most `fill`."""
        if len(sequences) == 1:
            self.add(*sequences[0])
            return
        total = sum(len(tokens) for tokens, _ in sequences)
        assert total <= self.fill, "sequences that share a row must fit in one"
        if len(self.tokens) + total > self.fill:
            self._close_row()
        for i, (tokens, flags) in enumerate(sequences):
            self._extend(tokens, flags, margin if i == 0 else 0.0)

    def pending_rows(self) -> int:
        return len(self.finished)

    def take(self, final: bool = False) -> Packed:
        """The finished rows (with `final`, the row in progress too, padded) as arrays."""
        if final and self.tokens:
            self._close_row()
        rows, self.finished = self.finished, []
        if not rows:
            return Packed(*(np.zeros((0, self.row_len), d) for d in self.dtypes))
        return Packed(*(np.stack(column) for column in zip(*rows, strict=True)))

    def _extend(self, tokens: list[int], flags: list[int], margin: float = 0.0) -> None:
        segment = (self.segments[-1] + 1) if self.segments else 1
        self.tokens.extend(tokens)
        self.flags.extend(flags)
        self.segments.extend([segment] * len(tokens))
        self.margins.extend([margin] * len(tokens))

    def _close_row(self) -> None:
        pad = [0] * (self.row_len - len(self.tokens))
        columns = (self.tokens + pad, self.segments + pad, self.flags + pad, self.margins + pad)
        # Finished rows are held as arrays: a list of Python ints costs ~8x the bytes.
        kept = columns[: len(self.dtypes)]  # the margins column in preference rows only
        self.finished.append(tuple(np.array(c, d) for c, d in zip(kept, self.dtypes, strict=True)))
        self.tokens, self.segments, self.flags, self.margins = [], [], [], []


def packer(cfg: DataConfig, row_len: int) -> Packer:
    """The packer of `cfg.format`. Preference rows hold at most seq_len = row_len - 1 tokens,
    so every sequence's last token is a model input (the reward model scores it there)."""
    if cfg.format == "preference":
        return Packer(row_len, split_documents=False, fill=row_len - 1, margins=True)
    return Packer(row_len, split_documents=_chunked(cfg))


def pack(
    examples: Iterable[tuple[list[int], list[int]]], row_len: int, split_documents: bool
) -> Packed:
    """Pack all `examples` into rows of `row_len` (see `Packer`)."""
    packer = Packer(row_len, split_documents)
    for ex_tokens, ex_flags in examples:
        packer.add(ex_tokens, ex_flags)
    return packer.take(final=True)


ROW_DTYPES = (np.int32, np.uint16, np.uint8)
MARGIN_DTYPE = np.float32


def row_bytes(row_len: int, margins: bool = False) -> int:
    """Bytes of one cached row; `margins`: with the margins column (preference rows)."""
    dtypes = ROW_DTYPES + (MARGIN_DTYPE,) * margins
    return sum(np.dtype(d).itemsize for d in dtypes) * row_len


def tokenizer_key(cfg: TokenizerConfig, data_cfg: DataConfig) -> str:
    """What of the rendering goes into a cache key: the tokenizer's files, the BOS/EOS choices
    and the chat template (a template FILE by its bytes)."""
    h = hashlib.sha256(tokenizer.fingerprint(cfg.path))
    h.update(repr((cfg.add_bos, cfg.add_eos, data_cfg.chat_template)).encode())
    if data_cfg.chat_template not in (None, *CHAT_TEMPLATE_NAMES):
        h.update(io.read_bytes(data_cfg.chat_template))
    return h.hexdigest()


def batch_arrays(packed: Packed) -> dict[str, np.ndarray]:
    """Model inputs from packed rows: tokens/targets/segment_ids and per-target loss weights
    (and, for preference rows, the per-input `margins`)."""
    seg = packed.segments.astype(np.int32)
    weights = (packed.flags[:, 1:] == 1) & (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
    arrays = {
        "tokens": packed.tokens[:, :-1],
        "targets": packed.tokens[:, 1:],
        "segment_ids": seg[:, :-1],
        "weights": weights.astype(np.float32),
    }
    if packed.margins is not None:
        arrays["margins"] = packed.margins[:, :-1]
    return arrays
