"""Peak memory of one phase of a benchmark: the device's, not the process's whole history.

On a GPU, torch.cuda's max allocated since the phase began. On CPU, the peak resident memory since
the phase began (VmHWM, reset through /proc/self/clear_refs; where that is refused, RSS polled every
2 ms). Run CPU workers with MALLOC_TRIM_THRESHOLD_=0 so glibc hands freed blocks back at once and
resident memory follows what is live.
"""

from __future__ import annotations

import gc
import os
import threading


class PhasePeak:
    def __init__(self, device):
        import torch

        self.torch, self.device = torch, device
        self.cuda = device.type == "cuda"
        self.reset_works = self._reset_hwm()
        self._polled = 0
        self._stop = threading.Event()
        if not self.cuda and not self.reset_works:
            threading.Thread(target=self._poll, daemon=True).start()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    @staticmethod
    def hwm() -> int:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        return 0

    @staticmethod
    def _reset_hwm() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
            return True
        except OSError:
            return False

    def _poll(self) -> None:
        while not self._stop.wait(0.002):
            self._polled = max(self._polled, self.rss())

    def start(self) -> None:
        gc.collect()
        if self.cuda:
            self.torch.cuda.synchronize(self.device)
            self.torch.cuda.empty_cache()
            self.torch.cuda.reset_peak_memory_stats(self.device)
        elif self.reset_works:
            self._reset_hwm()
        else:
            self._polled = self.rss()

    def peak(self) -> int:
        if self.cuda:
            self.torch.cuda.synchronize(self.device)
            return int(self.torch.cuda.max_memory_allocated(self.device))
        return self.hwm() if self.reset_works else max(self._polled, self.rss())
