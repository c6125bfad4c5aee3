"""Preference pairs and the tiny model config the DPO and reward-model parity tests share."""

from __future__ import annotations

import dataclasses

from tests.fixtures_hf import BASE

# Small enough for a tokenizer trained in the test; long enough for a pair to have a prompt.
CFG = dataclasses.replace(BASE, vocab_size=512, max_seq_len=128)
# Code, digits, tabs, mixed case, emoji and accents: each pair differs in what it tokenises to.
RECORDS = [
    {"prompt": "line 1: the quick", "chosen": " brown fox jumps", "rejected": " lazy dogs"},
    {"prompt": "def add(a, b):", "chosen": "\n    return a + b", "rejected": " pass # sum 1234"},
    {"prompt": "numbers", "chosen": " 3.14159", "rejected": " SHOUTING and CamelCaseWords now"},
    {"prompt": "tabs\tand", "chosen": " spaces", "rejected": " emoji 🙂🚀!"},
    {"prompt": "café, 東京", "chosen": " naïve", "rejected": " over 12 lazy dogs"},
]
