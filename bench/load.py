"""Machine load recorded next to every measurement, the wait for a quiet machine, peak RSS, and
`measure`: best of N timed calls with the load seen meanwhile (retried when others were busy)."""

from __future__ import annotations

import contextlib
import os
import resource
import time

QUIET = {"max_wait_s": 0.0}  # --wait-quiet: before every case / e2e run, wait up to this long for a quiet machine


def _proc_stat_busy() -> float:
    """Seconds of CPU time all processes have used since boot (all cores)."""
    with open("/proc/stat") as f:
        parts = [int(x) for x in f.readline().split()[1:]]
    idle = parts[3] + (parts[4] if len(parts) > 4 else 0)
    return (sum(parts[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds(tree_root: int | None = None) -> float:
    """CPU seconds of this process (all threads), or of a process tree when tree_root is given."""
    if tree_root is None:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime
    # imported here: cases run in their own subprocess (bench/case.py); the parent loads no model library
    import psutil

    total = 0.0
    try:
        root = psutil.Process(tree_root)
        for p in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                total += t.user + t.system
    except psutil.Error:
        pass
    return total


class LoadProbe:
    """Load around a measurement: 1-min load average at start/end and the average number of cores
    that *other* processes kept busy during the window (system busy time minus our own)."""

    def __init__(self, tree_root: int | None = None):
        self.tree_root = tree_root

    def __enter__(self):
        self.t0 = time.perf_counter()
        self.load_start = os.getloadavg()[0]
        self.busy0 = _proc_stat_busy()
        self.own0 = _own_cpu_seconds(self.tree_root)
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.t0
        self.load_end = os.getloadavg()[0]
        busy = _proc_stat_busy() - self.busy0
        own = _own_cpu_seconds(self.tree_root) - self.own0
        self.own_cores = own / self.wall if self.wall > 0 else 0.0
        self.foreign_cores = max(0.0, busy - own) / self.wall if self.wall > 0 else 0.0
        return False

    def record(self) -> dict:
        return {"load1_start": round(self.load_start, 2), "load1_end": round(self.load_end, 2),
                "foreign_cores": round(self.foreign_cores, 3), "own_cores": round(self.own_cores, 3)}


def loadavg() -> dict:
    a, b, c = os.getloadavg()
    return {"load1": a, "load5": b, "load15": c}


def busy_cores(window_s: float = 5.0) -> float:
    """Average number of cores busy (all processes) over the next window_s seconds."""
    b0, t0 = _proc_stat_busy(), time.perf_counter()
    time.sleep(window_s)
    return (_proc_stat_busy() - b0) / (time.perf_counter() - t0)


def wait_quiet(max_wait_s: float, threshold: float = 0.3, windows: int = 2) -> dict:
    """Wait (up to max_wait_s) until the machine is quiet: `windows` consecutive 5 s windows with
    fewer than `threshold` cores busy (this process sleeps meanwhile, so that is everyone else).
    The 1-min load average lags by a minute or two, so it is recorded but not waited on."""
    t0 = time.time()
    quiet = 0
    last = None
    while time.time() - t0 < max_wait_s:
        last = busy_cores()
        quiet = quiet + 1 if last < threshold else 0
        if quiet >= windows:
            break
    return {"waited_s": round(time.time() - t0, 1), "quiet": quiet >= windows, "busy_cores_last_5s": None if last is None else round(last, 3),
            "threshold_cores": threshold, **loadavg()}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


MAX_FOREIGN_CORES = 0.25  # a measurement during which others used more than this is retried (with --wait-quiet)


def measure(run_once, reps: int, quiet_wait_s: float = 0.0, retries: int = 2) -> tuple[dict, object]:
    """Best of `reps` calls of run_once() -> (seconds, payload), with the load seen meanwhile (and
    every call's seconds of the kept attempt, `seconds_all`).

    With quiet_wait_s > 0: wait for a quiet machine first, and if other processes still used more
    than MAX_FOREIGN_CORES during the measurement, wait and measure again (up to `retries` times),
    keeping the attempt with the least foreign load."""
    best_attempt = None
    attempts = 0
    for attempt in range(1 + (retries if quiet_wait_s else 0)):
        waited = wait_quiet(quiet_wait_s) if quiet_wait_s else None
        best = None
        seconds = []
        with LoadProbe() as probe:
            for _ in range(reps):
                dt, payload = run_once()
                seconds.append(dt)
                if best is None or dt < best[0]:
                    best = (dt, payload)
        attempts += 1
        rec = {"seconds": best[0], "reps": reps, "seconds_all": seconds, **probe.record(), "quiet_wait_s": waited["waited_s"] if waited else None}
        if best_attempt is None or rec["foreign_cores"] < best_attempt[0]["foreign_cores"]:
            best_attempt = (rec, best[1])
        if probe.foreign_cores <= MAX_FOREIGN_CORES:
            break
    best_attempt[0]["attempts"] = attempts
    return best_attempt
