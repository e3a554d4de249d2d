"""When a waiting thread polls instead of sleeping (clustorage.poll_windows): times in,
decisions out."""

from __future__ import annotations

import pytest

from clustorage.poll_windows import CREDIT, LATE, RETRY_AFTER, PollWindows

POLL = LATE / 2  # a window's length here: its end is not a late turn


def window(windows: PollWindows, start: float, caught: int) -> float:
    """A message at ``start``, ``caught`` more within the window, then the window's end;
    the time it ended."""
    assert windows.arrived(start) is True
    now = start
    for _ in range(caught):
        now += POLL / 4
        assert windows.turn(now) is True
        windows.waited(POLL / 100)
        assert windows.arrived(now) is False  # caught by the open window
    now += POLL * 1.5
    assert windows.turn(now) is False
    assert windows.open is False
    return now


def test_a_message_opens_a_window_that_its_turns_keep_until_it_ends() -> None:
    windows = PollWindows(POLL)
    assert windows.open is False
    assert windows.arrived(10.0) is True
    assert windows.open is True
    assert windows.turn(10.0 + POLL / 2) is True
    windows.waited(POLL / 100)
    assert windows.open is True
    assert windows.turn(10.0 + POLL) is False
    assert windows.open is False


def test_a_message_caught_extends_the_window() -> None:
    windows = PollWindows(POLL)
    windows.arrived(10.0)
    assert windows.turn(10.0 + POLL * 0.9) is True
    assert windows.arrived(10.0 + POLL * 0.9) is False  # no second window: the same one
    assert windows.turn(10.0 + POLL * 1.5) is True
    assert windows.turn(10.0 + POLL * 2) is False


@pytest.mark.parametrize(("caught", "windows_before"), [(0, 2), (1, 4)])
def test_windows_that_catch_few_messages_stop_the_polling_for_a_while(
    caught: int, windows_before: int
) -> None:
    windows = PollWindows(POLL)
    now = 0.0
    for _ in range(windows_before):
        now = window(windows, now + 1.0, caught)
    opened = [windows.arrived(now + 1.0 + i) for i in range(RETRY_AFTER)]
    assert opened == [False] * (RETRY_AFTER - 1) + [True]  # then it tries again


def test_a_window_that_catches_several_messages_earns_credit() -> None:
    windows = PollWindows(POLL)
    now = window(windows, 1.0, caught=0)
    now = window(windows, now + 1.0, caught=2)
    now = window(windows, now + 1.0, caught=0)
    assert windows.arrived(now + 1.0) is True


def test_turns_that_come_late_end_the_window_and_stop_the_polling() -> None:
    """A thread whose yield and poll take long (another thread held the GIL, or the CPU was
    busy) gains nothing from polling: whatever the window caught, it ends, and costs."""
    windows = PollWindows(1.0)
    now = 0.0
    for _ in range(2):
        now += 10.0
        assert windows.arrived(now) is True
        for _ in range(3):
            windows.arrived(now)
        assert windows.turn(now + 0.001) is True  # within the window
        windows.waited(LATE * 2)
        assert windows.open is False
    assert windows.arrived(now + 10.0) is False


def test_a_quick_yield_and_poll_leave_the_window_open() -> None:
    windows = PollWindows(1.0)
    windows.arrived(0.0)
    assert windows.turn(0.5) is True  # the turn's own work before it does not count
    windows.waited(LATE / 2)
    assert windows.open is True


def test_credit_is_capped() -> None:
    """However long polling has paid, two windows that catch nothing stop it."""
    windows = PollWindows(POLL)
    now = 0.0
    for _ in range(CREDIT * 3):
        now = window(windows, now + 1.0, caught=3)
    for _ in range(2):
        now = window(windows, now + 1.0, caught=0)
    assert windows.arrived(now + 1.0) is False


def test_no_window_when_told_not_to_poll() -> None:
    windows = PollWindows(0.0)
    assert windows.arrived(1.0) is False
    assert windows.open is False
