"""What every recorded figure carries beside it: the command that produced it, the machine and the date."""

from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path


def provenance(command: str) -> dict:
    """{command, date (UTC), machine, 1-minute load average}: the load says how busy the shared machine was."""
    import torch

    return {
        "command": command,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, "
        + (torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"),
        "cpu": cpu_model(),
        "load_average_1min_at_start": round(os.getloadavg()[0], 2),
    }


def cpu_model() -> str:
    """The processor's name (speed figures differ between machines of one kind: AMD EPYC, Intel Xeon...)."""
    return cpuinfo("model name") or platform.processor() or platform.machine()


def cpuinfo(field: str) -> str:
    """The first processor's `field` in /proc/cpuinfo ("model name", "flags"...); "" where there is none."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(field):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def write_record(record: dict, path: str | Path) -> None:
    """A record as indented JSON, its folder made if needed (results/ is where the project keeps them)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
