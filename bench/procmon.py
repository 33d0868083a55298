"""Running processes and measuring them: wall time, CPU of the whole tree, peak RSS.

- CPU: ``os.wait4`` returns the child's own usage plus that of every descendant
  it waited for (worker pools included), so ``utime + stime`` is the tree's CPU.
- Peak RSS: a thread samples ``/proc`` every ``interval`` seconds and sums the
  resident set of the process and all its live descendants (shared pages are
  counted once per process, as ``ps`` would); the same samples
  the largest single process of the tree.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import threading
import time
import urllib.request
from dataclasses import dataclass

_PAGE = os.sysconf("SC_PAGE_SIZE")


def _ppids() -> dict[int, int]:
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # pid (comm) state ppid ...; comm may hold spaces or parentheses
        rest = stat[stat.rfind(b")") + 2 :].split()
        out[int(name)] = int(rest[1])
    return out


def tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for pid, ppid in _ppids().items():
        children.setdefault(ppid, []).append(pid)
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, ()))
    return found


def memory_of(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) in bytes; (0, 0) when the process is gone."""
    rss = hwm = 0
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmHWM:"):
                    hwm = int(line.split()[1]) * 1024
                elif line.startswith(b"VmRSS:"):
                    rss = int(line.split()[1]) * 1024
                    break  # VmRSS follows VmHWM
    except (OSError, IndexError, ValueError):
        return 0, 0
    return rss, hwm


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            parts = f.read().split(b"\0")
    except OSError:
        return "?"
    text = " ".join(os.path.basename(p.decode(errors="replace")) if i == 0 else p.decode(errors="replace")
                    for i, p in enumerate(parts) if p)
    return text[:80]


class RssSampler(threading.Thread):
    def __init__(self, root: int, interval: float = 0.05):
        super().__init__(daemon=True)
        self.root = root
        self.interval = interval
        self.peak_tree = 0
        self.peak_single = 0
        self.by_process: dict[int, list] = {}  # pid -> [peak VmHWM, short command line]
        self.peak_processes = 0
        self.samples = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            pids = tree(self.root)
            total = 0
            for pid in pids:
                rss, hwm = memory_of(pid)
                total += rss
                if hwm:
                    if pid not in self.by_process:
                        self.by_process[pid] = [0, _cmdline(pid)]
                    self.by_process[pid][0] = max(self.by_process[pid][0], hwm)
                # the process's own high-water mark since its exec (not inherited from the bench)
                self.peak_single = max(self.peak_single, hwm)
            self.peak_tree = max(self.peak_tree, total)
            self.peak_processes = max(self.peak_processes, len(pids))
            self.samples += 1
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)


@dataclass
class Measured:
    returncode: int
    wall_s: float
    cpu_s: float
    user_s: float
    sys_s: float
    peak_rss_tree_bytes: int
    max_rss_single_bytes: int  # max VmHWM over the tree's processes (sampled)
    ru_maxrss_bytes: int  # wait4: includes the RSS the child inherited at fork from the bench
    rss_samples: int
    max_processes: int
    peak_by_process: list  # [(peak VmHWM bytes, command line)], largest first
    stdout: bytes
    stderr_path: str


def run_measured(argv: list[str], *, env: dict, cwd: str, stderr_path: str, timeout: float,
                 rss_interval: float = 0.05) -> Measured:
    """Run ``argv`` to completion; stdout is captured (keep it small), stderr goes to a file."""
    with open(stderr_path, "wb") as err:
        started = time.perf_counter()
        proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    sampler = RssSampler(proc.pid, rss_interval)
    sampler.start()
    chunks = []
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    while True:  # drain stdout until EOF (the child exited or closed it), bounded by the deadline
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: the contender and its workers
            break
        ready, _, _ = select.select([fd], [], [], min(remaining, 1.0))
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    proc.stdout.close()
    sampler.stop()
    return Measured(
        returncode=proc.returncode,
        wall_s=wall,
        cpu_s=usage.ru_utime + usage.ru_stime,
        user_s=usage.ru_utime,
        sys_s=usage.ru_stime,
        peak_rss_tree_bytes=sampler.peak_tree,
        max_rss_single_bytes=sampler.peak_single,
        ru_maxrss_bytes=usage.ru_maxrss * 1024,
        rss_samples=sampler.samples,
        max_processes=sampler.peak_processes,
        peak_by_process=sorted(((v[0], v[1]) for v in sampler.by_process.values()), reverse=True),
        stdout=b"".join(chunks),
        stderr_path=stderr_path,
    )


class Service:
    """A fake server in its own process: started, announced port, ready, stopped."""

    def __init__(self, argv: list[str], *, env: dict, cwd: str, log_path: str, timeout: float = 60.0):
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=self._log,
                                     stdin=subprocess.DEVNULL)
        try:
            self.port = self._read_port(timeout)
            self.url = f"http://127.0.0.1:{self.port}"
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def _read_port(self, timeout: float) -> int:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        line = b""
        while not line.endswith(b"\n"):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.proc.poll() is not None:
                raise RuntimeError(f"{self.proc.args} did not announce its port (see {self._log.name})")
            fd = self.proc.stdout.fileno()
            ready, _, _ = select.select([fd], [], [], min(remaining, 1.0))
            if ready:
                byte = os.read(fd, 1)  # unbuffered: nothing beyond the line is consumed
                if not byte:
                    raise RuntimeError(f"{self.proc.args} exited (see {self._log.name})")
                line += byte
        return int(line.split()[1])

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError as exc:
                last = exc
                # wait for the port to accept connections (bounded by the deadline)
                threading.Event().wait(0.05)  # poll interval, bounded by the deadline
        raise RuntimeError(f"{self.proc.args} not ready: {last}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self.proc.stdout:
            self.proc.stdout.close()
        self._log.close()
