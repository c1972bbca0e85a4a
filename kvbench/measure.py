"""Peak memory per phase: CUDA's max allocated after a reset, or the process's resident-set high-water mark.

On Linux the RSS high-water mark (VmHWM) is reset by writing 5 to /proc/self/clear_refs, so prefill and decode
peaks are measured apart on CPU too. Where that file is not writable the lifetime maximum is reported, and the
kind says so.
"""

from __future__ import annotations

import resource
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

CLEAR_REFS = Path("/proc/self/clear_refs")
STATUS = Path("/proc/self/status")


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        CLEAR_REFS.write_text("5")
    except OSError:
        pass


def read_peak(device: torch.device) -> int:
    """Peak bytes since the last ``reset_peak``."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    for line in STATUS.read_text().splitlines() if STATUS.is_file() else []:
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_kind(device: torch.device) -> str:
    if device.type == "cuda":
        return "cuda_max_allocated"
    try:
        CLEAR_REFS.write_text("5")
        return "cpu_rss_high_water_per_phase"
    except OSError:
        return "cpu_max_rss_lifetime"


# Tensor methods that make the host wait for a value computed on the device.
HOST_READS = frozenset({"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy"})


class HostSyncCounter(TorchFunctionMode):
    """Counts host-blocking tensor reads (``HOST_READS``) made inside the block.

    On a GPU each one drains the launch queue; on a CPU it measures the same structure of the code.
    """

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in HOST_READS:
            self.count += 1
        return func(*args, **kwargs)
