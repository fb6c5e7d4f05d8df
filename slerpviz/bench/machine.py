"""Where a benchmark ran, and the one memory figure each device lets us measure honestly."""

from __future__ import annotations

import ctypes
import ctypes.util
import datetime
import functools
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch
import transformers


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit(root: Path | None = None) -> str | None:
    """The commit checked out at `root` (default: this checkout), '-dirty' where its tracked files were changed."""
    try:
        root = Path(__file__).resolve().parents[2] if root is None else root
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5)
        if out.returncode == 0:
            return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return None


@functools.cache
def commit_at_start() -> str | None:
    """The commit of the code this process runs: read once, when a run starts (`command.main` asks first), not when
    a run of an hour ends and the working tree may have moved on; and not at import, which the app does too."""
    return git_commit()


def machine_info(device: torch.device, argv: list[str] | None = None) -> dict:
    """Enough to name the machine a table came from and to re-run it."""
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "command": " ".join(["python -m slerpviz.bench", *(sys.argv[1:] if argv is None else argv)]),
        "git_commit": commit_at_start(),
        "utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        # How busy the machine was: timings on a shared CPU are noisy.
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    return info


# ----------------------------------------------------------------------------------------------------------------
# Peak memory of one run
# ----------------------------------------------------------------------------------------------------------------


class PeakMemory:
    """Peak memory one run adds above what was resident when it started.

    CUDA: the caching allocator's own counter (max_memory_allocated, reset before each run): exact.
    CPU: PyTorch keeps no counter, so this reads the rise of the process's peak resident set (VmHWM, reset through
    /proc/self/clear_refs) over the run. Freed heap memory is first handed back to the system (malloc_trim), or a
    run would reuse what the one before it left and show almost nothing. It counts every allocation in the
    process, so it is a rough figure, labelled "cpu_rss_delta". Where neither works it is None, never a guess.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "cuda_allocated" if device.type == "cuda" else ("cpu_rss_delta" if _can_reset_rss() else None)
        self._start = 0

    def start(self) -> None:
        if self.kind == "cuda_allocated":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        elif self.kind == "cpu_rss_delta":
            _trim_heap()
            _reset_peak_rss()
            self._start = _status_bytes("VmRSS")

    def peak(self) -> int | None:
        """Bytes above the start; call after the run has finished."""
        if self.kind == "cuda_allocated":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self._start
        if self.kind == "cpu_rss_delta":
            return max(_status_bytes("VmHWM") - self._start, 0)
        return None


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise OSError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> None:
    # "5" resets the peak resident set size to the current one (Linux 4.0+).
    Path("/proc/self/clear_refs").write_text("5")


@functools.cache
def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def _trim_heap() -> None:
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is not None:  # glibc only; elsewhere the figure undercounts more, nothing worse
        trim(0)


def _can_reset_rss() -> bool:
    try:
        _reset_peak_rss()
        _status_bytes("VmHWM")
        return True
    except OSError:
        return False
