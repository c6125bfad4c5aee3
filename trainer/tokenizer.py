"""Tokenizers by path: a sentencepiece `tokenizer.model` or a Hugging Face `tokenizer.json`.

`tokenizer.path` names either file, or a directory holding one (the usual Hugging Face model
directory; `tokenizer.json` is preferred there, as transformers prefers its fast tokenizer);
local or gs://. A `tokenizer.json` is run by the `tokenizers` library (the Rust tokenizer
transformers itself uses), with its named special tokens (BOS, EOS, ...), extra added tokens
and chat template read from the `tokenizer_config.json` / `special_tokens_map.json` /
`chat_template.jinja` beside it, as `transformers.AutoTokenizer` reads them: token ids equal
`AutoTokenizer(text, add_special_tokens=False)`, special tokens written in the text included.
A tokenizer AutoTokenizer loads as transformers' `LlamaTokenizer` (Llama 2's: its
tokenizer_config.json names that class) is rebuilt as that class builds it, from the vocabulary
and merges of its tokenizer.json or tokenizer.model: transformers ignores the normalizer a Llama 2
tokenizer.json carries and prefixes words by the config's `legacy` flag. A sentencepiece model
loaded as anything else is run by sentencepiece, which is what transformers' own conversion of
it reproduces. BOS and EOS are added by the data pipeline, as the recipe's `add_bos`/`add_eos` say.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, Protocol

from trainer import io
from trainer.config import RecipeError, TokenizerConfig

if TYPE_CHECKING:
    from tokenizers import Tokenizer as RustTokenizer

TOKENIZER_JSON = "tokenizer.json"
SENTENCEPIECE_MODEL = "tokenizer.model"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # where transformers 5 saves a chat template
MODEL_CONFIG = "config.json"
CONFIG_FILES = (TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP, CHAT_TEMPLATE_FILE)
# transformers' SPECIAL_TOKENS_ATTRIBUTES: the names a chat template sees them under.
SPECIAL_TOKEN_NAMES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
# LlamaTokenizer's defaults, for a tokenizer_config.json that names none.
LLAMA_SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}

Offsets = list[tuple[int, int]]


class Tokenizer(Protocol):
    """What the data pipeline and chat rendering need from a tokenizer."""

    cfg: TokenizerConfig
    special_tokens: dict[str, str]  # {"bos_token": "<s>", ...}: the variables templates see
    chat_template: str | None  # the tokenizer's own Jinja chat template, if it has one
    chat_template_names: tuple[str, ...]  # its named templates, when it has several

    @property
    def vocab_size(self) -> int: ...

    @property
    def bos_id(self) -> int | None: ...

    @property
    def eos_id(self) -> int | None: ...

    @property
    def special_ids(self) -> dict[str, int]: ...

    def encode(self, text: str) -> list[int]: ...

    def encode_with_offsets(self, text: str) -> tuple[list[int], Offsets]: ...

    def decode(self, ids: Iterable[int]) -> str: ...


def bos(tok: Tokenizer) -> list[int]:
    """[BOS] when the recipe adds one and the tokenizer has one, else []."""
    return [tok.bos_id] if tok.cfg.add_bos and tok.bos_id is not None else []


def eos(tok: Tokenizer) -> list[int]:
    """[EOS] when the recipe adds one and the tokenizer has one, else []."""
    return [tok.eos_id] if tok.cfg.add_eos and tok.eos_id is not None else []


def tokenizer_files(path: str) -> list[str]:
    """The files that make up the tokenizer at `path`, its model file first: a tokenizer.json
    brings the config files beside it; a directory brings its model file and config files."""
    if not path:
        raise RecipeError(
            "tokenizer.path: set it to a tokenizer.model, a tokenizer.json or a model directory"
        )
    if path.endswith(".model"):
        return [path]
    if path.endswith(".json"):
        directory, main = _parent(path), path
    else:
        if not io.isdir(path):
            raise RecipeError(f"tokenizer.path: {path} is not a tokenizer file or directory")
        directory, names = path, io.listdir(path)
        found = [n for n in (TOKENIZER_JSON, SENTENCEPIECE_MODEL) if n in names]
        if not found:
            raise RecipeError(
                f"tokenizer.path: {path} holds neither {TOKENIZER_JSON} nor {SENTENCEPIECE_MODEL}; "
                "point tokenizer.path at the tokenizer"
            )
        main = io.join(path, found[0])
    extras = [io.join(directory, n) for n in CONFIG_FILES if io.exists(io.join(directory, n))]
    return [main, *extras]


def fingerprint(path: str) -> bytes:
    """A digest of every file of the tokenizer at `path`, and of how transformers would load
    it (for data cache keys)."""
    h = hashlib.sha256()
    main, *extras = tokenizer_files(path)
    files = {file: io.read_bytes(file) for file in (main, *extras)}
    for file, data in files.items():
        h.update(file.rsplit("/", 1)[-1].encode())
        h.update(data)
    configs = {f.rsplit("/", 1)[-1]: files[f].decode() for f in extras}
    if _llama_options(main, files[main], configs) is not None:  # config.json decides it too
        h.update(b"LlamaTokenizer")
    return h.digest()


def load_tokenizer(cfg: TokenizerConfig) -> Tokenizer:
    """The tokenizer `cfg.path` names (see the module docstring)."""
    from tokenizers import Tokenizer as RustTokenizer

    main, *extras = tokenizer_files(cfg.path)
    configs = {f.rsplit("/", 1)[-1]: io.read_text(f) for f in extras}
    try:
        source = io.read_bytes(main)
        llama = _llama_options(main, source, configs)
        if llama is not None:
            tk = _llama_tokenizer(main, source, llama)
            return HFTokenizer(cfg, tk, configs, defaults=LLAMA_SPECIAL_TOKENS)
        if main.endswith(".model"):
            return SentencePieceTokenizer(cfg, source, configs)
        return HFTokenizer(cfg, RustTokenizer.from_str(source.decode()), configs)
    except RecipeError:
        raise
    except Exception as e:  # sentencepiece: RuntimeError; tokenizers: Exception; JSON: ValueError
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise RecipeError(f"tokenizer.path: {main} cannot be loaded ({reason})") from e


def _llama_options(main: str, source: bytes, configs: dict[str, str]) -> dict | None:
    """{"prepend_scheme", "add_prefix_space"} of the LlamaTokenizer AutoTokenizer would load the
    tokenizer at `main` as, else None. It does when tokenizer_config.json names that class,
    unless config.json beside it is another family's (transformers loads Mistral's and OLMo's
    tokenizers with its generic backend, Qwen's with its own class) or tokenizer.json is
    byte-level (Llama 3 style, also loaded with the generic backend)."""
    config = json.loads(configs.get(TOKENIZER_CONFIG, "{}"))
    if str(config.get("tokenizer_class")).removesuffix("Fast") != "LlamaTokenizer":
        return None
    model_config = io.join(_parent(main), MODEL_CONFIG)
    model_type = (
        json.loads(io.read_text(model_config)).get("model_type")
        if io.exists(model_config)
        else None
    )
    if model_type not in (None, "llama"):
        return None
    if main.endswith(".json") and b'"ByteLevel"' in source:
        return None
    add_prefix_space = config.get("add_prefix_space") is not False
    # transformers' _get_prepend_scheme: legacy puts "▁" before the text after every special
    # token, non-legacy (LlamaTokenizer's default) only at the start of the text.
    scheme = ("always" if config.get("legacy") else "first") if add_prefix_space else "never"
    return {"prepend_scheme": scheme, "add_prefix_space": add_prefix_space}


def _llama_tokenizer(main: str, source: bytes, options: dict) -> RustTokenizer:
    """The tokenizer transformers' LlamaTokenizer builds: BPE over the vocabulary and merges
    of tokenizer.json (its normalizer and pre-tokenizer are dropped) or tokenizer.model (merges
    ranked by piece id), with byte fallback, no normalizer, and "▁" for spaces and as the prefix
    `options` says."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as RustTokenizer

    if main.endswith(".model"):
        vocab, added = _sentencepiece_pieces(source)
        merges = _merges_by_id(vocab)
    else:
        spec = json.loads(source)
        vocab = spec["model"]["vocab"]
        if isinstance(vocab, list):  # a Unigram's [piece, score] list
            vocab = {piece: i for i, (piece, _) in enumerate(vocab)}
        merges = [
            tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
            for m in spec["model"].get("merges", [])
        ]
        added = [
            AddedToken(**{k: v for k, v in t.items() if k != "id"})
            for t in spec.get("added_tokens", [])
        ]
    tk = RustTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme=options["prepend_scheme"], split=False
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if options["add_prefix_space"]:
        steps.append(decoders.Strip(content=" ", left=1))
    tk.decoder = decoders.Sequence(steps)
    tk.add_tokens(added)
    return tk


def _sentencepiece_pieces(model: bytes) -> tuple[dict[str, int], list]:
    """A sentencepiece model's {piece: id}, and its control (special) and user-defined pieces
    as the added tokens transformers makes of them."""
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import AddedToken

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model)
    control, user_defined = 3, 4  # ModelProto.SentencePiece.Type
    added = [
        AddedToken(p.piece, normalized=False, special=p.type == control)
        for p in proto.pieces
        if p.type in (control, user_defined)
    ]
    return {p.piece: i for i, p in enumerate(proto.pieces)}, added


def _merges_by_id(vocab: dict[str, int]) -> list[tuple[str, str]]:
    """transformers' generate_merges: every split of a piece into two pieces, ranked by the id
    of the piece they make, then by the lengths and the ids of the two."""
    merges = []
    for piece, rank in vocab.items():
        splits = [(piece[:i], piece[i:]) for i in range(1, len(piece))]
        found = [(left, right) for left, right in splits if left in vocab and right in vocab]
        found.sort(key=lambda pair: (vocab[pair[0]], vocab[pair[1]]))
        merges += [(left, right, rank) for left, right in found]
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])))
    return [(left, right) for left, right, _ in merges]


class SentencePieceTokenizer:
    """A sentencepiece model; special tokens are its own BOS/EOS/UNK pieces."""

    def __init__(self, cfg: TokenizerConfig, model: bytes, configs: dict[str, str]):
        import sentencepiece as spm

        self.cfg = cfg
        self.sp = spm.SentencePieceProcessor(model_proto=model)
        pieces = {"bos_token": self.sp.bos_id(), "eos_token": self.sp.eos_id()}
        pieces["unk_token"] = self.sp.unk_id()
        self.special_tokens = {k: self.sp.id_to_piece(i) for k, i in pieces.items() if i >= 0}
        longest_first = sorted(self.special_tokens.values(), key=len, reverse=True)
        self._special_pattern = re.compile("|".join(map(re.escape, longest_first)) or "(?!)")
        self.chat_template, self.chat_template_names = _chat_template(configs)

    @property
    def vocab_size(self) -> int:
        return self.sp.vocab_size()

    @property
    def bos_id(self) -> int | None:
        return self.sp.bos_id() if self.sp.bos_id() >= 0 else None

    @property
    def eos_id(self) -> int | None:
        return self.sp.eos_id() if self.sp.eos_id() >= 0 else None

    @property
    def special_ids(self) -> dict[str, int]:
        """Each special piece's text -> its id (the only pieces a rendered chat turns into
        ids whole)."""
        return {piece: self.sp.piece_to_id(piece) for piece in self.special_tokens.values()}

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_with_offsets(self, text: str) -> tuple[list[int], Offsets]:
        """Ids and the character span of `text` each came from; the special pieces (`<s>`,
        `</s>`) written in `text`, as chat templates write them, become their ids."""
        ids: list[int] = []
        offsets: Offsets = []
        start = 0
        for match in self._special_pattern.finditer(text):
            self._encode_plain(text, start, match.start(), ids, offsets)
            ids.append(self.sp.piece_to_id(match.group()))
            offsets.append(match.span())
            start = match.end()
        self._encode_plain(text, start, len(text), ids, offsets)
        return ids, offsets

    def _encode_plain(self, text: str, start: int, end: int, ids: list, offsets: Offsets) -> None:
        if start == end:
            return
        proto = self.sp.encode(text[start:end], out_type="proto")
        char_at_byte = _char_index_of_bytes(text[start:end])  # sentencepiece counts bytes
        ids.extend(p.id for p in proto.pieces)
        offsets.extend(
            (start + char_at_byte[p.begin], start + char_at_byte[p.end]) for p in proto.pieces
        )

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode(list(ids))


class HFTokenizer:
    """A Hugging Face tokenizer (`tokenizers.Tokenizer`), completed from its config files as
    transformers does; `defaults`: the named special tokens of the transformers class it is,
    where tokenizer_config.json names none."""

    def __init__(
        self,
        cfg: TokenizerConfig,
        tk: RustTokenizer,
        configs: dict[str, str],
        defaults: dict[str, str] | None = None,
    ):
        self.cfg = cfg
        self.tk = tk
        config = (defaults or {}) | json.loads(configs.get(TOKENIZER_CONFIG, "{}"))
        named = _named_special_tokens(config, json.loads(configs.get(SPECIAL_TOKENS_MAP, "{}")))
        self._add_missing_tokens(config, named)
        self.special_tokens = {name: _content(token) for name, token in named.items()}
        self.chat_template, self.chat_template_names = _chat_template(configs)

    def _add_missing_tokens(self, config: dict, named: dict[str, object]) -> None:
        """transformers adds config-declared tokens (added_tokens_decoder, in id order, then the
        named and extra special tokens) that tokenizer.json lacks, in that order."""
        from tokenizers import AddedToken

        have = {t.content for t in self.tk.get_added_tokens_decoder().values()}
        declared = config.get("added_tokens_decoder") or {}
        wanted = [declared[k] for k in sorted(declared, key=int)]
        extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
        wanted += list(named.values()) + list(extra.values() if isinstance(extra, dict) else extra)
        named_contents = {_content(t) for t in named.values()}
        for token in wanted:
            content = _content(token)
            if content in have:
                continue
            spec = dict(token) if isinstance(token, dict) else {"content": content, "special": True}
            spec.pop("__type", None)
            spec["special"] = spec.get("special", False) or content in named_contents
            self.tk.add_tokens([AddedToken(**spec)])
            have.add(content)

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int | None:
        return self._id("bos_token")

    @property
    def eos_id(self) -> int | None:
        return self._id("eos_token")

    def _id(self, name: str) -> int | None:
        token = self.special_tokens.get(name)
        return self.tk.token_to_id(token) if token is not None else None

    @property
    def special_ids(self) -> dict[str, int]:
        """Each special token's text -> its id: the added tokens marked special, and the named
        ones (which transformers treats as special wherever they are in the vocabulary)."""
        added = self.tk.get_added_tokens_decoder()
        ids = {token.content: i for i, token in added.items() if token.special}
        named = {text: self.tk.token_to_id(text) for text in self.special_tokens.values()}
        return ids | {text: i for text, i in named.items() if i is not None}

    def encode(self, text: str) -> list[int]:
        return self.tk.encode(text, add_special_tokens=False).ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], Offsets]:
        encoding = self.tk.encode(text, add_special_tokens=False)
        return encoding.ids, list(encoding.offsets)

    def decode(self, ids: Iterable[int]) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=False)


def _named_special_tokens(config: dict, special_map: dict) -> dict[str, object]:
    """bos_token etc. as transformers resolves them: tokenizer_config.json, where a legacy
    special_tokens_map.json (only read without added_tokens_decoder) overrides."""
    merged = dict(config)
    if "added_tokens_decoder" not in config:
        merged.update(special_map)
    return {name: merged[name] for name in SPECIAL_TOKEN_NAMES if merged.get(name) is not None}


def _content(token: object) -> str:
    return token["content"] if isinstance(token, dict) else str(token)


def _chat_template(configs: dict[str, str]) -> tuple[str | None, tuple[str, ...]]:
    """(template, names): chat_template.jinja, else tokenizer_config.json's chat_template, a
    string or a list of named templates of which transformers uses "default"."""
    if CHAT_TEMPLATE_FILE in configs:
        return configs[CHAT_TEMPLATE_FILE], ()
    template = json.loads(configs.get(TOKENIZER_CONFIG, "{}")).get("chat_template")
    if isinstance(template, list):
        named = {t["name"]: t["template"] for t in template}
        return named.get("default"), tuple(named)
    return template, ()


def _char_index_of_bytes(text: str) -> list[int]:
    """For each UTF-8 byte offset of `text` (and its end), the index of the character there."""
    index = []
    for i, char in enumerate(text):
        index.extend([i] * len(char.encode("utf-8")))
    index.append(len(text))
    return index


def _parent(path: str) -> str:
    return path.rsplit("/", 1)[0] if "/" in path else "."
