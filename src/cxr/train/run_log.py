"""A training run's command log: ``commands.txt`` in the run folder lists, in order, the commands that built the
model in it (``cxr train``, then ``cxr calibrate``); ``cxr export`` puts them on the model card. A command is
recorded once it has done its work, so the log lists what built the model, not the attempts; commands that only
read the run (``cxr evaluate``, ``cxr export``) record nothing there."""

from __future__ import annotations

from pathlib import Path

#: The log's name in a run folder.
COMMANDS_FILE = "commands.txt"


def record(run_dir: Path, command: str) -> Path | None:
    """Append ``command`` (one line) to ``run_dir``'s log; returns the log, or None for an empty command."""
    command = " ".join(command.split())
    if not command:
        return None
    log = Path(run_dir) / COMMANDS_FILE
    with open(log, "a") as f:
        f.write(command + "\n")
    return log


def recorded(run_dir: Path) -> list[str]:
    """The commands of ``run_dir``'s log, in order (none when it has no log)."""
    log = Path(run_dir) / COMMANDS_FILE
    return [c for c in log.read_text().splitlines() if c.strip()] if log.exists() else []
