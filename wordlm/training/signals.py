"""Ctrl-C and SIGTERM as a clean stop at the next batch boundary.

Main names: ``StopRequests``, ``ignore_termination``. Must not import Sacred.

An interrupt that lands in the middle of an optimizer step would leave weights half-updated, and a
checkpoint of that state could not resume exactly. So while training steps run, SIGINT and SIGTERM
(what schedulers send before preemption) only *request* a stop; the loop honours it between batches
by raising ``KeyboardInterrupt``. Outside steps, and on a second signal, the interrupt is immediate.

Processes of a distributed run must stop together, at the same batch, so there a second signal waits
as well (a scheduler may signal the launcher and every process at once), and a stop that another
process received is taken over with ``request``.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

__all__ = ["SIGNALS", "StopRequests", "ignore_termination"]

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequests:
    """Install handlers for SIGINT/SIGTERM for the duration of a ``with`` block.

    Args:
        second_interrupts: whether a second signal interrupts at once, even in a ``deferred`` block. Without it
            (a distributed run) a repeat is never more than the first: torchrun forwards the signal a worker
            may also get from the terminal or a scheduler, and the copy can land a moment later, while
            the stopped run writes its checkpoint or evaluates test.
        ignore_term_after_error: whether SIGTERM stays ignored when an error (not a stop) leaves the
            block. A process of a distributed run that fails is on its way out, and the SIGTERM that
            torchrun sends to every process once one has failed must not cut off its error line and
            its run record.
    """

    def __init__(self, second_interrupts: bool = True, ignore_term_after_error: bool = False) -> None:
        self.requested: int | None = None  # the signal number of the first request
        self._second_interrupts = second_interrupts
        self._ignore_term_after_error = ignore_term_after_error
        self._deferring = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, exc_type, *exc_info) -> None:
        failed = exc_type is not None and not issubclass(exc_type, KeyboardInterrupt)
        for signum, handler in self._previous.items():
            # SIG_IGN in place of the restore, not after it: no moment with SIGTERM's default (death) between
            ignored = failed and self._ignore_term_after_error and signum == signal.SIGTERM
            signal.signal(signum, signal.SIG_IGN if ignored else handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        first = self.requested is None
        self.requested = self.requested or signum
        if not first and not self._second_interrupts:
            return
        if self._deferring and first:
            return
        raise KeyboardInterrupt(signal.Signals(signum).name)

    @contextmanager
    def deferred(self):
        """In this block a first signal waits for ``check``; a second interrupts at once if ``second_interrupts``."""
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False

    @contextmanager
    def immediate(self):
        """Within a ``deferred`` block, let signals interrupt at once (e.g. during a long validation)."""
        self.check()
        deferring, self._deferring = self._deferring, False
        try:
            yield
        finally:
            self._deferring = deferring

    def request(self, signum: int) -> None:
        """Record a stop requested elsewhere (by a signal to another process of the run), unless one is."""
        self.requested = self.requested or signum

    def check(self) -> None:
        """Raise ``KeyboardInterrupt`` if a stop was requested (call it where state is consistent)."""
        if self.requested is not None:
            raise KeyboardInterrupt(signal.Signals(self.requested).name)

    @property
    def name(self) -> str:
        return signal.Signals(self.requested).name if self.requested else ""


def ignore_termination() -> None:
    """Ignore SIGTERM from now on (in the main thread): for a process that is already ending by itself."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
