"""Training runs started from the UI: each one an ``alpaca-lora finetune`` process of its own.

A run is a separate process in its own process group, its output going to ``train.log`` in the run
folder, so a run that crashes (bad data, out of memory) ends that process only and the UI reports its
exit status and log. Stop sends SIGTERM, the same graceful stop as ``kill`` from a shell: the run saves
a checkpoint and exits 143. Resume starts the same command with ``--resume_from_checkpoint true``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alpaca_lora.errors import ConfigError, shown
from alpaca_lora.ui.run_folder import LOG_FILE, UI_CONFIG

EXIT_MEANINGS = {0: "finished", 130: "stopped (Ctrl-C), checkpoint saved", 143: "stopped, checkpoint saved",
                 2: "refused its settings (see the log)", 1: "failed (see the log)"}
"""What the exit status of ``alpaca-lora finetune`` means (see the command's help)."""


@dataclass
class TrainingRun:
    """One ``alpaca-lora finetune`` process started by the UI.

    Attributes:
        output_dir: The run folder.
        command: The command line it runs.
        process: The process (None before it starts).

    """

    output_dir: Path
    command: list[str]
    process: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        """Whether the process is alive."""
        return self.process is not None and self.process.poll() is None

    def status(self) -> str:
        """``running (pid N)``, or how it ended."""
        if self.process is None:
            return "not started"
        code = self.process.poll()
        if code is None:
            return f"running (pid {self.process.pid})"
        meaning = EXIT_MEANINGS.get(code, "failed (see the log)" if code > 0 else f"killed by signal {-code}")
        return f"{meaning} (exit status {code})"

    def stop(self) -> bool:
        """Ask the run to stop gracefully (SIGTERM to its process group); False when it was not running."""
        if not self.running:
            return False
        assert self.process is not None
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
        except ProcessLookupError:
            return False
        return True


@dataclass
class Trainer:
    """The runs this UI started, by run folder (one live process per folder)."""

    runs: dict[Path, TrainingRun] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self, base_model: str, data: str, output_dir: Path, settings: dict[str, Any],
              resume: bool = False) -> TrainingRun:
        """Start ``alpaca-lora finetune`` for ``output_dir`` (resuming its newest checkpoint when ``resume``).

        Args:
            base_model: The base model folder.
            data: The data file.
            output_dir: The run folder (created).
            settings: FinetuneConfig fields, written to ``ui_config.json`` in the run folder and given as ``--config``.
            resume: Continue from the newest checkpoint in ``output_dir``.

        Raises:
            ConfigError: A run is already going in that folder.

        """
        output_dir = Path(output_dir)
        with self._lock:
            current = self.runs.get(output_dir)
            if current is not None and current.running:
                raise ConfigError(f"a run is already training in {shown(str(output_dir))}; stop it first, or pick "
                                  "another run name")
            output_dir.mkdir(parents=True, exist_ok=True)
            config = output_dir / UI_CONFIG
            config.write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
            command = [sys.executable, "-m", "alpaca_lora", "finetune", "--base_model", str(base_model),
                       "--data", str(data), "--output_dir", str(output_dir), "--config", str(config)]
            if resume:
                command += ["--resume_from_checkpoint", "true"]
            run = TrainingRun(output_dir, command)
            run.process = _spawn(command, output_dir / LOG_FILE, append=resume)
            self.runs[output_dir] = run
            return run

    def resume(self, output_dir: Path) -> TrainingRun | None:
        """Start the last command of ``output_dir`` again, resuming its newest checkpoint (None: none known)."""
        run = self.runs.get(Path(output_dir))
        if run is None:
            return None
        with self._lock:
            if run.running:
                raise ConfigError(f"{shown(str(output_dir))} is still training; stop it before resuming")
            command = [*run.command]
            if "--resume_from_checkpoint" not in command:
                command += ["--resume_from_checkpoint", "true"]
            resumed = TrainingRun(run.output_dir, command)
            resumed.process = _spawn(command, run.output_dir / LOG_FILE, append=True)
            self.runs[run.output_dir] = resumed
            return resumed

    def get(self, output_dir: Path) -> TrainingRun | None:
        """The run this UI started in ``output_dir``, if any."""
        return self.runs.get(Path(output_dir))

    def stop_all(self) -> None:
        """Stop every running run (when the UI shuts down)."""
        for run in self.runs.values():
            run.stop()


def _spawn(command: list[str], log: Path, append: bool) -> subprocess.Popen[bytes]:
    """Start ``command`` in its own process group (a Ctrl-C of the UI does not reach it), output to ``log``."""
    package_root = str(Path(__file__).resolve().parents[2])  # the child runs this same alpaca_lora
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    with log.open("ab" if append else "wb") as out:
        out.write(("$ " + " ".join(command[1:]) + "\n").encode())
        out.flush()
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)
