"""Which rows make global batch i: a pure function of (seed, i) and the caches' row counts.

Nothing here holds a per-row table: shuffles are seeded bijections of [0, n) (a Feistel network
with cycle walking), evaluated only at the positions a batch needs, so the first batch of a
corpus of any size costs the same, and every process computes the same rows.

Each dataset is read as an endless *stream*: its rows in a fresh shuffled order every pass.

- Without weights an epoch takes `size` rows, `fraction` x its rows or (neither) all of its
  rows from each dataset's stream, continuing where the previous epoch stopped (so every
  epoch sees a different subset, and consecutive subsets cover the dataset before repeating),
  and shuffles all of them together.
- With weights, the batch stream is cut into blocks of BLOCK rows; each dataset fills its
  share of every block (largest-remainder rounding of BLOCK x weight), at shuffled slots.
  An "epoch" (for train.epochs) is then the total rows of all datasets.
- Unshuffled (eval), the datasets still take their slots in the seeded order, so eval
  batches mix the datasets by their shares (exactly over a block, by chance in one batch),
  and each stream has one seeded order for every pass: the same rows at every eval, and a
  `fraction`, `size` or `eval.batches` subset is a random one, not a file's first rows.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

from trainer.cache import ShardedReader
from trainer.config import MIXTURE_BLOCK as BLOCK
from trainer.config import DatasetConfig, weighted_counts

ROUNDS = 4
MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def permute(positions: np.ndarray, n: int, key: tuple[int, ...]) -> np.ndarray:
    """Positions mapped through the seeded bijection of [0, n) named by `key`."""
    half = max(1, (int(n - 1).bit_length() + 1) // 2)
    mask = np.uint64((1 << half) - 1)
    round_keys = np.random.SeedSequence(list(key)).generate_state(ROUNDS, np.uint64)
    x = np.asarray(positions, np.uint64).copy()
    outside = np.ones(x.shape, bool)
    while outside.any():  # cycle walking: values past n go round again, until inside [0, n)
        y = x[outside]
        left, right = y >> np.uint64(half), y & mask
        for k in round_keys:
            left, right = right, left ^ (_mix(right ^ k) & mask)
        x[outside] = (left << np.uint64(half)) | right
        outside = x >= np.uint64(n)
    return x.astype(np.int64)


def _mix(v: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a cheap, well-spread round function."""
    with np.errstate(over="ignore"):
        v = (v ^ (v >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        v = (v ^ (v >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return (v ^ (v >> np.uint64(31))) & MASK64


class Mixture:
    """Global batch `i` of `batch_size` rows over one or more datasets' caches."""

    def __init__(
        self,
        readers: list[ShardedReader],
        entries: list[DatasetConfig],
        batch_size: int,
        seed: int,
        shuffle: bool = True,
    ):
        self.reader = ShardedReader.concat(readers)
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.sizes = np.array([r.rows for r in readers], np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)[:-1]])
        self.weighted = entries[0].weight is not None
        if self.weighted:
            self.per_block = np.array(weighted_counts([e.weight for e in entries]), np.int64)
        else:
            self.per_epoch = np.array(
                [_epoch_rows(e, int(n)) for e, n in zip(entries, self.sizes, strict=True)]
            )
        shares = self.per_block if self.weighted else self.per_epoch
        self.starts = np.concatenate([[0], np.cumsum(shares)])  # slot ranges per dataset

    def epoch_rows(self) -> int:
        return int(self.sizes.sum() if self.weighted else self.per_epoch.sum())

    def steps_for(self, epochs: float) -> int:
        """Optimizer steps that `epochs` passes take, the last one partly new rows; `epochs`
        as the recipe wrote it: 1.1 epochs of 100 steps is 110, not 1.1 * 100 rounded up."""
        return math.ceil(Fraction(repr(epochs)) * self.epoch_rows() / self.batch_size)

    def batch_rows(self, step: int) -> np.ndarray:
        """Global row ids (into `self.reader`) of global batch `step`."""
        flat = np.arange(step * self.batch_size, (step + 1) * self.batch_size, dtype=np.int64)
        return self.rows_at(flat)

    def rows_at(self, positions: np.ndarray) -> np.ndarray:
        """Global row ids at positions of the whole (endless) row sequence."""
        period = BLOCK if self.weighted else self.epoch_rows()
        chunks, offsets = np.divmod(positions, period)
        slots = offsets.copy()
        for chunk in np.unique(chunks):  # seeded even unshuffled (eval): in slot order the
            here = chunks == chunk  # first dataset would fill every eval batch
            slots[here] = self._permuted(offsets[here], period, ("order", int(chunk)))
        dataset = np.searchsorted(self.starts, slots, side="right") - 1
        shares = self.per_block if self.weighted else self.per_epoch
        streamed = chunks * shares[dataset] + slots - self.starts[dataset]
        rows = np.empty_like(positions)
        for d in np.unique(dataset):
            here = dataset == d
            rows[here] = self.offsets[d] + self.stream(int(d), streamed[here])
        return rows

    def stream(self, dataset: int, positions: np.ndarray) -> np.ndarray:
        """Rows of `dataset` (its own numbering) at positions of its endless stream."""
        n = int(self.sizes[dataset])
        passes, offsets = np.divmod(positions, n)
        rows = offsets.copy()
        for p in np.unique(passes):
            here = passes == p
            order = int(p) if self.shuffle else 0  # eval: one order for every pass
            rows[here] = self._permuted(offsets[here], n, ("stream", dataset, order))
        return rows

    def epoch_subset(self, dataset: int, epoch: int) -> np.ndarray:
        """The rows of `dataset` (its own numbering) that epoch `epoch` uses (unweighted)."""
        share = int(self.per_epoch[dataset])
        return self.stream(dataset, np.arange(epoch * share, (epoch + 1) * share))

    def _permuted(self, positions: np.ndarray, n: int, name: tuple) -> np.ndarray:
        return permute(positions, n, (self.seed, *[_int(part) for part in name]))


def _epoch_rows(entry: DatasetConfig, rows: int) -> int:
    if entry.size is not None:
        return entry.size
    if entry.fraction is not None:
        return max(1, round(entry.fraction * rows))
    return rows


def _int(part: int | str) -> int:
    return part if isinstance(part, int) else int.from_bytes(part.encode(), "little")
