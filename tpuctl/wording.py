"""Counts in messages: `1 worker`, `4 workers`, never `1 workers` or `worker(s)`.

Apart from the CLI so that the layers below it (jobs, babysit, fan-out, providers) word
their messages the same way without importing it."""


def plural(count: int, noun: str) -> str:
    """`count` and `noun`, the noun in the plural unless there is one: `1 worker`,
    `0 workers`, `32 workers`."""
    return f"{count} {noun if count == 1 else noun + 's'}"
