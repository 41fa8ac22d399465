"""Shared pieces of the benchmarks: what machine and versions a result came from, timers, memory
probes, and writers for markdown tables, JSON and plots.

Every results file starts with the same record (date, machine, load, versions, git commit), so a
table in `benchmarks/results/` always says where and with what it was measured.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import importlib.metadata
import json
import os
import platform
import re
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
PACKAGES = (
    "torch",
    "diffusers",
    "transformers",
    "peft",
    "lycoris-lora",
    "tensorly",
    "accelerate",
    "safetensors",
)


# --- where a result comes from ----------------------------------------------------------------


def _cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown"
    match = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
    return match.group(1).strip() if match else platform.processor() or "unknown"


def _memory_gib() -> float | None:
    try:
        kib = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
    except (OSError, AttributeError):
        return None
    return round(kib / 2**20, 1)


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(
            ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device: str = "cpu", threads: int | None = None) -> dict:
    """Date, machine, load, versions and commit: the header of every results file."""
    import torch

    gpu = torch.cuda.get_device_name(0) if device.startswith("cuda") and torch.cuda.is_available() else None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).astimezone().isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "cpu": _cpu_model(),
            "logical_cpus": os.cpu_count(),
            "memory_gib": _memory_gib(),
            "gpu": gpu,
        },
        "device": device,
        "torch_threads": threads if threads is not None else torch.get_num_threads(),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "versions": {package: _version(package) for package in PACKAGES},
        "git_commit": _git("rev-parse", "--short", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no", "--", "plugin")),
    }


def environment_markdown(env: dict) -> str:
    machine = env["machine"]
    versions = ", ".join(f"{name} {version}" for name, version in env["versions"].items() if version)
    where = machine["gpu"] or f"{machine['cpu']}, {machine['logical_cpus']} logical CPUs"
    load = env.get("loadavg_range") or env["loadavg"]
    return "\n".join(
        [
            f"- date: {env['date']}",
            f"- machine: {where}, {machine['memory_gib']} GiB RAM ({machine['platform']})",
            f"- device: {env['device']}, torch threads: {env['torch_threads']}, load average: {load}",
            f"- versions: Python {env['python']}, {versions}",
            f"- commit: {env['git_commit']}{' (plugin/ modified)' if env['git_dirty'] else ''}",
        ]
    )


# --- timing and memory ------------------------------------------------------------------------


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def timed(fn: Callable[[], object], device: str = "cpu", clock: str = "wall") -> float:
    """Seconds `fn()` takes, the device synchronised before and after.

    `clock="cpu"` counts the CPU time of this process (all its threads) instead of wall time: on a
    machine shared with other work, that is what the work itself costs, without the time spent
    waiting for a core.
    """
    now = CLOCKS[clock]
    synchronize(device)
    start = now()
    fn()
    synchronize(device)
    return now() - start


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def spread(values: Sequence[float]) -> float:
    """Sample standard deviation (0 for a single value)."""
    return statistics.stdev(values) if len(values) > 1 else 0.0


def release_free_memory() -> None:
    """Hand freed heap pages back to the OS (glibc), so the resident size is what is in use."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _status_kib(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"no {field} in /proc/self/status")
    return int(match.group(1))


def rss_mib() -> float:
    """Resident set size of this process now."""
    return _status_kib("VmRSS") / 1024


def reset_peak_rss() -> None:
    """Start the peak resident size (VmHWM, which `getrusage().ru_maxrss` reads) afresh from now."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_rss_mib() -> float:
    """Peak resident set size since the last `reset_peak_rss()` (or since the process started)."""
    return _status_kib("VmHWM") / 1024


# --- writers ----------------------------------------------------------------------------------


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]], align: str = "") -> str:
    """A GitHub markdown table; `align` has one letter per column (l/r), default left then right."""
    align = align or "l" + "r" * (len(headers) - 1)
    rule = ["---:" if a == "r" else ":---" for a in align]
    lines = [headers, rule, *[[str(cell) for cell in row] for row in rows]]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def write_json(path: Path, payload: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    return path


def write_markdown(path: Path, title: str, env: dict, body: str, command: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = (
        f"# {title}\n\n{environment_markdown(env)}\n\nRegenerate with:\n\n```bash\n{command}\n```\n\n{body}\n"
    )
    path.write_text(text)
    return path


def pyplot():
    """matplotlib with a file-only backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def command_line(argv: Sequence[str], script: str) -> str:
    """The command that reproduces a run, as a user would type it from the repository root."""
    import shlex

    return " ".join(["python", script, *(shlex.quote(a) for a in argv)])
