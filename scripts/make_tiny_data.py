"""Generate the tiny committed corpus and its sentencepiece tokenizer (recipes/data/).

Nothing is downloaded: the text comes from a small seeded grammar with learnable structure
(agreement, counting, arithmetic facts, repeated entities), so a tiny model's loss falls fast;
the preference pairs prefer counting in order to the same numbers shuffled.
Run from the repository root: `python scripts/make_tiny_data.py`.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import sentencepiece as spm

OUT = Path(__file__).resolve().parent.parent / "recipes" / "data"
VOCAB_SIZE = 512
SEED = 1234

ANIMALS = ["fox", "dog", "cat", "owl", "bear", "wolf", "hare", "crow", "mouse", "horse"]
COLOURS = ["red", "brown", "black", "white", "grey", "golden", "spotted", "pale"]
PLACES = ["river", "forest", "hill", "field", "barn", "garden", "lake", "valley"]
VERBS = [("runs", "run"), ("jumps", "jump"), ("sleeps", "sleep"), ("sings", "sing")]
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def story(rng: random.Random) -> str:
    """A short paragraph whose later sentences depend on earlier ones."""
    animal, colour, place = rng.choice(ANIMALS), rng.choice(COLOURS), rng.choice(PLACES)
    singular, plural = rng.choice(VERBS)
    count = rng.randint(2, 9)
    lines = [
        f"The {colour} {animal} {singular} by the {place}.",
        f"Every day the {animal} {singular} to the {place} and back.",
        f"{NUMBERS[count].capitalize()} {animal}s {plural} by the {place} at night.",
        f"When the {animal} is tired, the {colour} {animal} sleeps near the {place}.",
    ]
    rng.shuffle(lines[1:])
    return " ".join(lines)


def arithmetic(rng: random.Random) -> str:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    return f"{NUMBERS[a]} plus {NUMBERS[b]} is {a + b}. {a} + {b} = {a + b}."


def counting(rng: random.Random) -> str:
    start = rng.randint(0, 5)
    return "Counting: " + ", ".join(NUMBERS[start : start + rng.randint(3, 5)]) + "."


def document(rng: random.Random) -> str:
    parts = [rng.choice([story, arithmetic, counting])(rng) for _ in range(rng.randint(2, 5))]
    return " ".join(parts)


def chat(rng: random.Random) -> dict:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    return {
        "messages": [
            {"role": "system", "content": "You are good at sums."},
            {"role": "user", "content": f"What is {NUMBERS[a]} plus {NUMBERS[b]}?"},
            {"role": "assistant", "content": f"{NUMBERS[a]} plus {NUMBERS[b]} is {a + b}."},
        ]
    }


def preference(rng: random.Random) -> dict:
    """A DPO pair whose chosen response follows the rule (counting up in order) and whose
    rejected response names the same numbers out of order."""
    start, length = rng.randint(0, 5), rng.randint(3, 5)
    words = NUMBERS[start : start + length]
    shuffled = list(words)
    while shuffled == words:
        rng.shuffle(shuffled)
    return {
        "prompt": f"Count up from {words[0]}:",
        "chosen": " " + ", ".join(words) + ".",
        "rejected": " " + ", ".join(shuffled) + ".",
    }


def main() -> None:
    rng = random.Random(SEED)
    OUT.mkdir(parents=True, exist_ok=True)
    train = [document(rng) for _ in range(1500)]
    evaluation = [document(rng) for _ in range(200)]
    (OUT / "tiny_train.txt").write_text("\n\n".join(train) + "\n")
    (OUT / "tiny_eval.txt").write_text("\n\n".join(evaluation) + "\n")
    with (OUT / "tiny_chat.jsonl").open("w") as f:
        for _ in range(500):
            f.write(json.dumps(chat(rng)) + "\n")
    pairs = random.Random(SEED + 1)  # its own stream: the files above stay as they were
    for name, count in (("tiny_preference.jsonl", 600), ("tiny_preference_eval.jsonl", 100)):
        with (OUT / name).open("w") as f:
            for _ in range(count):
                f.write(json.dumps(preference(pairs)) + "\n")
    spm.SentencePieceTrainer.train(
        input=str(OUT / "tiny_train.txt"),
        model_prefix=str(OUT / "tokenizer"),
        vocab_size=VOCAB_SIZE,
        model_type="bpe",
        character_coverage=1.0,
        byte_fallback=True,
        pad_id=-1,
        bos_id=1,
        eos_id=2,
        unk_id=0,
        normalization_rule_name="identity",
        num_threads=1,
        minloglevel=2,
    )
    (OUT / "tokenizer.vocab").unlink()


if __name__ == "__main__":
    main()
