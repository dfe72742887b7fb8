"""stop_requests(): SIGTERM / first Ctrl-C become a request, a second Ctrl-C aborts, handlers come back."""

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from alpaca_lora.train.interrupt import stop_requests


def _deliver(sig, until=lambda: False):
    """Send ``sig`` to this process and give Python a moment to run its handler in the main thread."""
    os.kill(os.getpid(), sig)
    for _ in range(200):
        if until():
            return
        time.sleep(0.005)


@pytest.fixture
def own_handlers():
    """Install recognisable handlers (as a notebook kernel would) and put the originals back after."""

    def kernel_sigint(signum, frame):
        raise AssertionError("the kernel's SIGINT handler must not run inside stop_requests()")

    def kernel_sigterm(signum, frame):
        raise AssertionError("the kernel's SIGTERM handler must not run inside stop_requests()")

    old = {s: signal.signal(s, h) for s, h in ((signal.SIGINT, kernel_sigint), (signal.SIGTERM, kernel_sigterm))}
    yield kernel_sigint, kernel_sigterm
    for s, h in old.items():
        signal.signal(s, h)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_first_signal_is_a_request_and_handlers_are_restored(own_handlers, sig, caplog):
    with stop_requests() as stop:
        assert not stop.requested
        _deliver(sig, until=lambda: stop.requested)
        assert stop.signal == sig
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == own_handlers
    assert f"{sig.name} received" in caplog.text and "abort" in caplog.text


def test_second_ctrl_c_aborts_at_once_and_handlers_are_restored(own_handlers):
    with pytest.raises(KeyboardInterrupt), stop_requests() as stop:
        _deliver(signal.SIGINT, until=lambda: stop.requested)
        assert stop.requested
        _deliver(signal.SIGINT)
        raise AssertionError("the second Ctrl-C did not abort")
    assert stop.aborted  # the loop re-raises at the next step boundary if Python dropped the exception
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == own_handlers


def test_handlers_are_restored_when_the_body_raises(own_handlers):
    with pytest.raises(ValueError, match="boom"), stop_requests():
        assert signal.getsignal(signal.SIGINT) is not own_handlers[0]
        raise ValueError("boom")
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == own_handlers


def test_outside_the_main_thread_nothing_is_installed(own_handlers):
    seen = {}

    def body():
        with stop_requests() as stop:
            seen["handlers"] = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
            seen["requested"] = stop.requested

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    assert seen == {"handlers": own_handlers, "requested": False}


def test_second_sigterm_terminates_the_process():
    script = textwrap.dedent("""
        import os, signal, sys, time
        from alpaca_lora.train.interrupt import stop_requests
        with stop_requests() as stop:
            os.kill(os.getpid(), signal.SIGTERM)
            while not stop.requested:
                time.sleep(0.01)
            print("first SIGTERM recorded", flush=True)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)
        print("not terminated", flush=True)
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == -signal.SIGTERM, run.stderr[-2000:]
    assert run.stdout.strip() == "first SIGTERM recorded"
