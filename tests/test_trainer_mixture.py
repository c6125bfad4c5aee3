"""Batches as a pure function of (seed, step): shuffles that are bijections, epochs that cover a
dataset once, weighted shares, and fresh fraction/size subsets per epoch that a resume repeats."""

from __future__ import annotations

import numpy as np
import pytest

from trainer import mixture
from trainer.cache import ShardedReader
from trainer.config import DatasetConfig

ROW_LEN = 33


def readers(*rows: int) -> list[ShardedReader]:
    """Readers of caches with these row counts (batch_rows never opens a file)."""
    return [ShardedReader([(f"shard-{i}.rows", n)], ROW_LEN) for i, n in enumerate(rows)]


def entries(*fields: dict) -> list[DatasetConfig]:
    return [DatasetConfig(path=[f"d{i}"], **f) for i, f in enumerate(fields)]


@pytest.mark.parametrize("n", [1, 2, 5, 1000, 4097])
def test_permute_is_a_seeded_bijection(n):
    a = mixture.permute(np.arange(n), n, (0, 1))
    assert sorted(a.tolist()) == list(range(n))
    if n > 5:
        assert not (a == mixture.permute(np.arange(n), n, (0, 2))).all()
        assert (a[[3, 1]] == mixture.permute(np.array([3, 1]), n, (0, 1))).all()


def test_batches_are_a_pure_function_of_seed_and_step_and_cover_each_epoch():
    single = (readers(203), entries({}))
    a, b = mixture.Mixture(*single, 8, seed=3), mixture.Mixture(*single, 8, seed=3)
    assert (a.batch_rows(17) == b.batch_rows(17)).all()
    assert not (a.batch_rows(17) == mixture.Mixture(*single, 8, seed=4).batch_rows(17)).all()
    first_epoch = a.rows_at(np.arange(203))
    assert sorted(first_epoch.tolist()) == list(range(203))  # every row once per epoch
    assert not (a.rows_at(np.arange(203, 406)) == first_epoch).all()  # a new order next epoch
    hundred = mixture.Mixture(readers(400), entries({}), 4, seed=3)
    assert (hundred.steps_for(1.1), hundred.steps_for(0.5), a.steps_for(1)) == (110, 50, 26)


def test_unshuffled_eval_takes_every_row_once_per_pass_from_both_datasets():
    m = mixture.Mixture(readers(10, 5), entries({}, {}), 4, seed=0, shuffle=False)
    rows = m.rows_at(np.arange(15)).tolist()
    assert sorted(rows) == list(range(15))  # every row once per epoch
    assert any(r >= 10 for r in rows[:4])  # not dataset 0's rows first
    assert m.rows_at(np.arange(15)).tolist() == rows  # the same rows at every eval


def test_an_eval_subset_is_a_random_one_and_the_same_at_every_eval():
    """Unshuffled, `fraction: 0.1` read the first tenth of the rows: one file of a glob."""
    m = mixture.Mixture(readers(1000), entries({"fraction": 0.1}), 10, seed=0, shuffle=False)
    subset = m.rows_at(np.arange(100))
    assert len(set(subset.tolist())) == 100 and subset.max() > 500  # not rows 0-99
    again = mixture.Mixture(readers(1000), entries({"fraction": 0.1}), 10, seed=0, shuffle=False)
    assert (again.rows_at(np.arange(100)) == subset).all()


def test_eval_mixture_weights_hold_in_its_first_batches():
    """Unshuffled, the weighted block once listed dataset 0's 65536 x w0 slots first: every
    eval batch came from the first entry and the others' weights did nothing."""
    m = mixture.Mixture(
        readers(1000, 1000), entries({"weight": 1}, {"weight": 1}), 16, seed=0, shuffle=False
    )
    rows = np.concatenate([m.batch_rows(i) for i in range(8)])
    second = int((rows >= 1000).sum())
    assert 40 <= second <= 88, second  # 64 expected of 128; 4 sigma either side


def test_weights_give_each_dataset_its_share_of_rows():
    m = mixture.Mixture(
        readers(5000, 300, 40), entries(*[{"weight": w} for w in (6, 3, 1)]), 100, 0
    )
    rows = np.concatenate([m.batch_rows(i) for i in range(100)])  # 10k rows
    dataset = np.searchsorted(m.offsets, rows, side="right") - 1
    share = np.bincount(dataset, minlength=3) / len(rows)
    expected = np.array([0.6, 0.3, 0.1])
    tolerance = 4 * np.sqrt(expected * (1 - expected) / len(rows))  # 4 sigma of a binomial
    assert (np.abs(share - expected) < tolerance).all(), share
    small = rows[dataset == 2] - m.offsets[2]  # upsampled: every row of it, many times
    assert set(small.tolist()) == set(range(40))
    assert m.steps_for(1) == 54  # 5340 rows an epoch, by 100
    # The smallest weight a recipe may give (config refuses less) gets its row of every block.
    tiny = mixture.Mixture(readers(100, 10), entries({"weight": 65535}, {"weight": 1}), 64, 0)
    assert tiny.per_block.tolist() == [65535, 1]


def test_fraction_and_size_take_a_fresh_subset_each_epoch_that_a_resume_repeats():
    args = (readers(1000, 200, 30), entries({"fraction": 0.1}, {"size": 50}, {}), 20, 7)
    m = mixture.Mixture(*args)
    assert m.epoch_rows() == 100 + 50 + 30
    first, second = m.epoch_subset(0, 0), m.epoch_subset(0, 1)
    assert len(first) == len(set(first.tolist())) == 100 and not set(first) & set(second)
    assert set(m.epoch_subset(1, 3).tolist()) != set(m.epoch_subset(1, 4).tolist())
    resumed = mixture.Mixture(*args)  # a restarted run: same seed, same epoch
    assert (resumed.epoch_subset(0, 1) == second).all()
    epoch = m.rows_at(np.arange(180, 360))  # all of epoch 1
    assert sorted((epoch[epoch < 1000]).tolist()) == sorted(second.tolist())
    assert sorted(epoch[epoch >= 1200].tolist()) == list(range(1200, 1230))
    assert (resumed.batch_rows(11) == m.batch_rows(11)).all()
