"""When a thread that waits for messages should poll for a moment rather than sleep.

A message often follows another within tens of microseconds: a member's commit after the
loader's lease for a quick ``fn``, the next request of a loop. Sleeping in ``epoll_wait``
and being woken again costs more CPU than that wait (on a virtual machine, about 30 µs a
time), and delays the message by as much. So after a message a thread keeps polling for a
*window* of ``poll_for`` seconds, which each message it catches extends.

Polling pays only while messages come that soon, one after another. A window that catches
several earns credit; one that catches one or none costs some, and so does one that ends
because a turn's yield and poll took over ``LATE`` (the thread waited for the GIL, held by
other Python work in the process, or for a CPU: polling bought nothing). Without credit
the thread sleeps at once, and tries a window again every ``RETRY_AFTER`` messages. So a
thread whose peers are slow, or that shares its process or its CPUs with busy work, soon
stops polling. No I/O: the caller (clustorage.stay_awake, for the loader's loop) reads the
clock, yields and polls.
"""

from __future__ import annotations

__all__ = ["POLL_FOR", "PollWindows"]

POLL_FOR = 100e-6  # seconds; a member polls for its answer as long (member.SPIN)
CREDIT = 4  # at most; a window that catches several messages earns 1, one costs 1, none 2
RETRY_AFTER = 16  # messages without a window, once the credit is spent
LATE = 1e-3  # seconds a turn's yield and poll may take; more: the thread could not poll


class PollWindows:
    """The windows of one polling thread (not thread-safe: that thread's own)."""

    def __init__(self, poll_for: float = POLL_FOR) -> None:
        self._poll_for = poll_for
        self._until = 0.0
        self._open = False
        self._caught = 0  # messages the open window caught
        self._credit = CREDIT
        self._without = 0  # messages since the credit was spent

    @property
    def open(self) -> bool:
        """Whether a window is open: the thread polls instead of sleeping."""
        return self._open

    def arrived(self, now: float) -> bool:
        """A message arrived at ``now``: the open window catches it (and lasts ``poll_for``
        from now), or a new one opens if polling pays; whether one opened (the caller then
        starts polling)."""
        if self._poll_for <= 0:
            return False
        if self._open:
            self._caught += 1
            self._until = now + self._poll_for
            return False
        if self._credit <= 0:
            self._without += 1
            if self._without < RETRY_AFTER:
                return False
            self._without, self._credit = 0, 1
        self._open, self._caught = True, 0
        self._until = now + self._poll_for
        return True

    def turn(self, now: float) -> bool:
        """A turn of the open window begins at ``now``: whether to yield and poll (else the
        window has ended, and the thread may sleep)."""
        if now >= self._until:
            self._end(late=False)
            return False
        return True

    def waited(self, seconds: float) -> None:
        """The turn's yield and poll took ``seconds``: over ``LATE``, the window ends."""
        if self._open and seconds > LATE:
            self._end(late=True)

    def _end(self, late: bool) -> None:
        self._open = False
        self._credit = min(self._credit + self._earned(late), CREDIT)

    def _earned(self, late: bool) -> int:
        """What the window that ends earned: its turns came late, or it caught no
        message, one, or several."""
        if late or not self._caught:
            return -2
        return 1 if self._caught > 1 else -1
