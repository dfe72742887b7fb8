"""``alpaca-lora ui``: loopback by default, a warning for any other host, a missing folder a usage error."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from alpaca_lora.cli.main import main
from alpaca_lora.ui.app import exposure_warning


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost", "127.0.0.2"])
def test_loopback_hosts_need_no_warning(host):
    assert exposure_warning(host) is None


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.10", "example.org"])
def test_other_hosts_are_warned_about(host):
    assert f"listening on {host}" in exposure_warning(host) and "no login" in exposure_warning(host)


def test_a_missing_folder_is_a_usage_error(tmp_path, capsys):
    assert main(["--quiet", "ui", str(tmp_path / "nope")]) == 2
    assert "not a folder" in capsys.readouterr().err


def test_serving_on_all_interfaces_prints_a_warning_and_serves(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "alpaca_lora", "ui", str(tmp_path), "--host", "0.0.0.0",
                             "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
    try:
        deadline, page = time.monotonic() + 120, None
        while page is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                page = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5).read().decode()
            except OSError:
                time.sleep(0.5)
        assert page is not None and "alpaca-lora" in page, proc.poll()
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=60)
    assert "warning: listening on 0.0.0.0" in err
    assert "gradio.live" not in err  # no share link unless asked
