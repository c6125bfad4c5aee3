"""A run's stop tokens and generation settings, from its start to its export.

transformers' `generate()` starts from a model directory's generation_config.json and stops
at its `eos_token_id`, an id or a list of ids (Llama 3.1's stops at <|end_of_text|>,
<|eom_id|> and <|eot_id|>). A model fine-tuned from a Hugging Face one keeps that one's
generation settings, and a chat model must also stop where its template ends an assistant
turn: Llama 3's <|eot_id|>, which a base model's EOS is not. A chat model is served with
the chat template it was trained on, which the tokenizer it started from may not carry
(a base model's has none; `data.chat_template` may name another).

The trainer records these at the start of a run (`record`), with the model, in the run's
`checkpoints/model.json`, rather than where they came from: by export time model.init_from
may be gone, and a gs:// one was only ever read. The export writes them back
(`export_configs`).
"""

from __future__ import annotations

from typing import Any

from trainer.config import Recipe

StopIds = int | list[int]


def record(recipe: Recipe) -> dict[str, Any]:
    """What the export needs of `recipe`'s generation settings: model.init_from's
    generation_config.json ("config") and config.json eos_token_id ("eos_token_id"), and
    with chat data the id of the token that ends an assistant turn ("end_of_turn_id") and,
    where it is not the tokenizer's own, the Jinja chat template the run rendered its
    conversations with ("chat_template": tulu's as one); each only where there is one."""
    from trainer import chat
    from trainer.hf import generation_source
    from trainer.tokenizer import load_tokenizer

    found = generation_source(recipe.model.init_from) if recipe.model.init_from else {}
    if recipe.data.format == "chat":
        tok = load_tokenizer(recipe.tokenizer)
        template = chat.template_source(recipe.data.chat_template, tok)
        eot = chat.end_of_turn_id(template, tok)
        found |= {"end_of_turn_id": eot} if eot is not None else {}
        trained = template if template is not None else chat.tulu_template(tok)
        if trained != tok.chat_template:  # the export serves what the run trained on
            found["chat_template"] = trained
    return found


def export_configs(
    config: dict[str, Any],
    tokenizer_ids: dict[str, int],
    recorded: dict[str, Any],
    can_generate: bool,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """config.json and generation_config.json (None for a model that cannot generate, as
    transformers writes none) of an export: `config` with the tokenizer's bos/eos ids
    (`tokenizer_ids`) and the `recorded` source's stop ids, and the recorded source's
    generation config, else the one transformers writes for that config. Both stop at the
    tokenizer's EOS, which training put after every example, and at the token that ends an
    assistant turn of the run's chat template, besides the source's own stop ids."""
    more = (tokenizer_ids.get("eos_token_id"), recorded.get("end_of_turn_id"))
    config = config | tokenizer_ids | _with_stops(recorded.get("eos_token_id"), more)
    if not can_generate:
        return config, None
    source = recorded.get("config")
    if source is None:
        ids = {key: config[key] for key in ("bos_token_id", "eos_token_id") if key in config}
        source = {"_from_model_config": True, **ids}
    return config, source | _with_stops(source.get("eos_token_id"), more)


def _with_stops(source: StopIds | None, more: tuple[int | None, ...]) -> dict[str, StopIds]:
    """{"eos_token_id": `source`'s stop ids as it had them (an id, or a list) with the ids of
    `more` that it lacks added after them: a list once there are several}; {} when none."""
    ids = source if isinstance(source, list) else [] if source is None else [source]
    merged = list(dict.fromkeys([*ids, *(i for i in more if i is not None)]))
    if isinstance(source, list) or len(merged) > 1:
        return {"eos_token_id": merged}
    return {"eos_token_id": merged[0]} if merged else {}
