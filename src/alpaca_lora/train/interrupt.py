"""Graceful stops: SIGTERM or a first Ctrl-C ask training to stop at the next step boundary.

Preemptible machines send SIGTERM before they kill a job, and a notebook's "interrupt" button
sends SIGINT. Stopping in the middle of an optimizer step would lose the step and could leave a
checkpoint half written, so :func:`stop_requests` only records the request; the training loop
checks it after each step, saves a checkpoint and stops. A second signal aborts at once, without
saving: Ctrl-C raises ``KeyboardInterrupt`` (the usual Python behaviour), a second SIGTERM
terminates the process.

Handlers are installed only in the main thread (Python delivers signals there and nowhere else;
in any other thread the signals keep their usual effect) and the previous handlers are restored
on exit, whether training returned or raised, so a notebook kernel gets its own handler back.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

HANDLED = (signal.SIGINT, signal.SIGTERM)


@dataclass
class StopRequest:
    """Set by the signal handler; read by the training loop at each step boundary.

    Attributes:
        signal: The first signal received, or None.
        aborted: A second Ctrl-C came. Its ``KeyboardInterrupt`` is raised at once, but Python drops
            an exception raised while a ``__del__`` method runs, so the loop raises it again at the
            next step boundary when it sees this flag.

    """

    signal: signal.Signals | None = None
    aborted: bool = False

    @property
    def requested(self) -> bool:
        """True once a stop was asked for."""
        return self.signal is not None


@contextmanager
def stop_requests() -> Iterator[StopRequest]:
    """Turn SIGTERM and the first SIGINT into a :class:`StopRequest` for the duration.

    Yields:
        The request the loop polls. Outside the main thread it is never set and no handler is
        installed.

    Example:
        >>> with stop_requests() as stop:  # doctest: +SKIP
        ...     while not stop.requested:
        ...         train_one_step()

    """
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous: dict[signal.Signals, Any] = {}

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)

    def on_signal(signum: int, frame: Any) -> None:
        sig = signal.Signals(signum)
        if request.signal is not None:  # the second signal: abort now
            restore()
            if sig == signal.SIGINT:
                request.aborted = True
                raise KeyboardInterrupt
            os.kill(os.getpid(), signum)  # the default action of SIGTERM: terminate
            return
        request.signal = sig
        logger.warning("%s received: training stops after this step and saves a checkpoint to resume from "
                       "(%s again to abort at once)", sig.name,
                       "press Ctrl-C" if sig == signal.SIGINT else "send SIGTERM")

    for sig in HANDLED:
        previous[sig] = signal.signal(sig, on_signal)
    try:
        yield request
    finally:
        restore()
