"""Runs side by side: results in order whatever finishes first, and a bounded look-ahead."""

from __future__ import annotations

import threading
import time

import pytest

from harden.errors import HardenError
from harden.graph.parallel import concurrent_runs, ordered_map


def test_results_come_in_order_although_the_first_finishes_last() -> None:
    def slow_first(i: int) -> int:
        if i == 0:
            time.sleep(0.3)
        return i * i

    assert list(ordered_map(slow_first, range(8), workers=3)) == [i * i for i in range(8)]


def test_at_most_twice_the_workers_run_ahead_of_the_consumer() -> None:
    started: list[int] = []
    lock = threading.Lock()

    def note(i: int) -> int:
        with lock:
            started.append(i)
        return i

    results = ordered_map(note, range(100), workers=2)
    assert next(results) == 0
    time.sleep(0.2)
    assert len(started) <= 2 * 2 + 1  # the first result was taken when one more than 2 × workers were queued
    assert list(results) == list(range(1, 100))


def test_one_worker_is_a_plain_lazy_map() -> None:
    seen: list[int] = []
    results = ordered_map(lambda i: seen.append(i) or i, range(5), workers=1)
    assert seen == []
    assert list(results) == [0, 1, 2, 3, 4] and seen == [0, 1, 2, 3, 4]


def test_zero_threads_means_every_cpu_and_a_negative_count_is_refused() -> None:
    assert concurrent_runs(3) == 3
    assert concurrent_runs(0) >= 1
    with pytest.raises(HardenError, match="threads must be 0"):
        concurrent_runs(-1)
