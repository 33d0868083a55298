"""The lease: which connector works a sync, and for how long without renewing.

A sync is worked by one connector at a time. With PostgreSQL the sync's row
holds the lease (holder id, expiry by the DATABASE's clock, fence token);
SQLite's `flock` is its lease (held for as long as the store is open). The
holder renews every `lease / 3`; a standby polls at the same interval, so it
takes over at most `lease + lease / 3` after the holder's last renewal
(`takeover_bound`). Each acquisition increments the fence token, and every
write checks it in its own transaction, so a connector that lost the lease
cannot write, whatever it believes.
"""

from __future__ import annotations

import os
import secrets
import socket
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Callable, Protocol

from .errors import LeaseHeld

# Renew (holder) and poll (standby) this many times per lease length.
RENEWALS_PER_LEASE = 3


def renew_interval(lease: timedelta) -> float:
    """Seconds between renewals, and between a standby's polls: a third of the lease."""
    return lease.total_seconds() / RENEWALS_PER_LEASE


def takeover_bound(lease: timedelta) -> timedelta:
    """Longest time from a holder's death to a standby's takeover: the lease it last
    renewed runs out, then the standby's next poll finds it expired."""
    return lease + lease / RENEWALS_PER_LEASE


def holder_id() -> str:
    """`host:pid:random`: readable in `status`, unique per process and per start."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


@dataclass(frozen=True)
class LeaseState:
    """What this connector knows of its sync's lease, without asking the store."""

    sync: str
    held: bool  # this connector holds it (and, as far as it can tell, it has not run out)
    holder: str | None  # who holds it: this connector's id when held, else the last holder seen
    expires_at: datetime | None  # by the database's clock, as last seen; None for a flock
    fence: int = 0  # increments on every acquisition; every write checks it
    renewals: int = 0  # renewals by this connector
    acquisitions: int = 0  # times this connector acquired the lease
    takeovers: int = 0  # acquisitions of a lease another connector held and did not release

    @property
    def role(self) -> str:
        return "held" if self.held else "standby"

    def describe(self) -> str:
        holder = self.holder or "no one"
        until = f" until {self.expires_at.isoformat()} (database clock)" if self.expires_at else ""
        return f"the sync {self.sync!r} is worked by another connector: {holder}{until}"


class Leased(Protocol):
    def lease_state(self) -> LeaseState: ...

    def acquire(self) -> LeaseState: ...


def require_lease(store: Leased) -> LeaseState:
    """The lease of the store's sync, acquired if this connector does not hold it yet.

    Raises `LeaseHeld` when another connector holds it.
    """
    state = store.lease_state()
    if not state.held:
        state = store.acquire()
    if not state.held:
        raise LeaseHeld(state.describe())
    return state


class Renewer:
    """Calls `renew()` every `interval` seconds in a daemon thread, until it returns
    False (the lease is gone) or `stop()` is called. Its waits are on an Event, so
    a process resumed after SIGSTOP renews (or finds the lease gone) at once."""

    def __init__(self, renew: Callable[[], bool], interval: float, name: str = "lease-renewer"):
        self._renew = renew
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def start(self) -> "Renewer":
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            if not self._renew():
                return

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
