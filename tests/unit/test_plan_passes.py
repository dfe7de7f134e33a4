"""Splitting a batch into length groups when padding would cost more than a pass."""

from __future__ import annotations

import random

import pytest

from fmplex.triton_backend.executor import PASS_OVERHEAD, plan_passes


def cost(lengths: list[int], plan: list[list[int]]) -> int:
    return sum(len(g) * max(lengths[i] for i in g) + PASS_OVERHEAD for g in plan)


def test_equal_lengths_stay_one_pass() -> None:
    assert plan_passes([12] * 40) == [list(range(40))]


def test_soft_prompt_rows_get_their_own_pass() -> None:
    lengths = [14] * 56 + [22] * 8
    plan = plan_passes(lengths)
    assert sorted(map(sorted, plan)) == [list(range(56)), list(range(56, 64))]


def test_small_differences_are_not_worth_a_pass() -> None:
    assert len(plan_passes([12, 13, 14, 12, 15])) == 1


@pytest.mark.parametrize("seed", range(20))
def test_plan_is_a_partition_and_never_worse_than_one_pass(seed: int) -> None:
    rng = random.Random(seed)
    lengths = [rng.choice([rng.randint(5, 20), rng.randint(40, 256)]) for _ in range(rng.randint(1, 64))]
    plan = plan_passes(lengths)
    assert sorted(i for g in plan for i in g) == list(range(len(lengths)))
    assert 1 <= len(plan) <= 3
    assert cost(lengths, plan) <= cost(lengths, [list(range(len(lengths)))])
    # brute force over two-pass splits of the sorted rows: the DP is at least as good
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    for cut in range(1, len(lengths)):
        assert cost(lengths, plan) <= cost(lengths, [order[:cut], order[cut:]])
