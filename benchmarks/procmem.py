"""Peak memory and CPU time of a process tree (a run: driver, Ray's processes, workers, the object store). Memory is
sampled as the sum of PSS over the tree, so that shared pages (Ray's object store, mapped by many workers) count
once; CPU time is each process's user + system time, at its last sample."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path


def tree(root: int) -> set[int]:
    """``root`` and every process descending from it."""
    parents: dict[int, int] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            parents[int(pid)] = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    found, frontier = {root}, {root}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def pss_bytes(pids: set[int]) -> int:
    total = 0
    for pid in pids:
        try:
            text = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith("Pss:"):
                total += int(line.split()[1]) * 1024
                break
    return total


def cpu_seconds(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


class PeakMemory(threading.Thread):
    """Samples the summed PSS of ``root``'s tree every ``interval_s`` until :meth:`stop`; ``peak`` in bytes, and the
    CPU seconds of every process seen (:meth:`cpu_seconds`)."""

    def __init__(self, root: int, interval_s: float = 0.2):
        super().__init__(daemon=True)
        self.root, self.interval_s, self.peak = root, interval_s, 0
        self.cpu: dict[int, float] = {}
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            pids = tree(self.root)
            self.peak = max(self.peak, pss_bytes(pids))
            for pid in pids:
                seconds = cpu_seconds(pid)
                if seconds is not None:
                    self.cpu[pid] = max(self.cpu.get(pid, 0.0), seconds)
            time.sleep(self.interval_s)

    def cpu_seconds(self) -> float:
        return sum(self.cpu.values())

    def stop(self) -> int:
        self.done.set()
        self.join()
        return self.peak
