"""The token budget from a shape table: the rule, checked against every padded length, and its bad input."""

import pytest

from batchlab.fit.tokens import token_budget

TABLE = {128: 64, 256: 30, 512: 14, 1024: 6, 2048: 2}


def _fits(table, batch, length):
    """Ground truth under the stated assumption (peak non-decreasing in batch and length): a batch fits if it
    is within the measured largest batch at the next searched length."""
    next_length = min(L for L in table if L >= length)
    return batch <= table[next_length]


def test_budget_is_the_largest_under_which_every_padded_length_fits():
    budget = token_budget(TABLE)
    # the interval (1024, 2048] holds 2 samples at most: T // 1025 <= 2, so T = 3 * 1025 - 1
    assert budget.max_tokens == 3 * 1025 - 1 == 3074
    assert budget.limiting_length == 2048
    assert (budget.max_batch_size, budget.max_length) == (64, 2048)
    for length in range(1, 2049):  # every padded length, not only the searched ones
        assert _fits(TABLE, budget.batch_size_at(length), length), length
    # and it is the largest: one token more lets a batch of padded length 1025 hold 3 samples
    assert not _fits(TABLE, (budget.max_tokens + 1) // 1025, 1025)
    assert budget.batch_size_at(2049) == 0


def test_a_single_entry_and_an_unsorted_mapping():
    assert token_budget({512: 8}).max_tokens == 9 * 512 - 1
    assert token_budget(dict(reversed(list(TABLE.items())))) == token_budget(TABLE)


def test_bucket_batch_sizes_in_the_lhotse_nemo_form():
    budget = token_budget(TABLE)
    assert budget.bucket_batch_sizes() == [64, 30, 14, 6, 2]
    # a bin between searched lengths takes the next searched length's measured batch
    assert budget.bucket_batch_sizes([100, 300, 2048]) == [64, 14, 2]
    assert budget.lhotse_buckets([100, 300]) == {
        "bucket_duration_bins": [100, 300],
        "bucket_batch_size": [64, 14],
    }
    for edge, size in zip([100, 300, 2048], budget.bucket_batch_sizes([100, 300, 2048])):
        assert size >= budget.batch_size_at(edge)  # never less than the token budget allows there


@pytest.mark.parametrize(
    ("table", "match"),
    [
        ({}, r"invalid max_batch_by_length \{\}: expected a non-empty mapping"),
        ([128, 256], r"invalid max_batch_by_length \[128, 256\]"),
        ({0: 4}, "invalid padded length 0: expected an int >= 1"),
        ({128: 4, 256: 0}, "invalid largest batch at length 256 0: expected an int >= 1"),
        ({128.0: 4}, "invalid padded length 128.0"),
    ],
)
def test_bad_tables_are_refused_in_one_line(table, match):
    with pytest.raises(ValueError, match=match):
        token_budget(table)


@pytest.mark.parametrize(
    ("bins", "match"),
    [
        ([], r"invalid bins \[\]"),
        ([256, 128], r"invalid bins \[256, 128\]: expected strictly ascending"),
        ([128, 4096], "the last edge 4096 is longer than the longest searched length 2048"),
    ],
)
def test_bad_bins_are_refused(bins, match):
    with pytest.raises(ValueError, match=match):
        token_budget(TABLE).bucket_batch_sizes(bins)
