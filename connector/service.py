"""The `run` command's loop: sync due hours now and every poll interval, until stopped.

A failing tick is logged, kept as the store's last error and retried on later
ticks with backoff (poll interval x 2^n, at most one hour); the process keeps
running. A service answer that means the configuration is wrong (401/403, a
redirect, a 404 that is not the service's) may be a restarting server or proxy:
it is retried the same way, and ends the loop only when it persisted for
CONFIG_GRACE. A stop ends the loop at once.

A tick first makes sure this connector holds its sync's lease. When another
connector holds it (or takes it over mid-hour: `LeaseLost`), this one is a
standby: it logs so once per holder, stays healthy, and tries again every
lease/3 until the lease runs out or is released, then takes over.

After each successful tick, delivered hours are read back (`verify`).
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

import schedule

from .app import App
from .errors import ConfigError, ConnectorError, Interrupted, LeaseHeld, LeaseLost, Problem
from .health import serve
from .hours import iso_hour
from .lease import renew_interval, require_lease

log = logging.getLogger("connector")

MAX_BACKOFF = timedelta(hours=1)
# A PostHog or proxy restarting answers 401/404 for a minute or two; a wrong
# key or URL answers so for good.
CONFIG_GRACE = timedelta(minutes=15)


class Service:
    """One `run`: the schedule, the failure backoff, the health beats."""

    def __init__(self, app: App):
        self._app = app
        self._failures = 0
        self._retry_at: datetime | None = None
        self._config_error_since: datetime | None = None
        self._announced_end = False
        self._standby = False
        self._standby_holder: str | None = None
        self._announced_fence = 0

    def run(self) -> None:
        """Serve until stopped; raises `Interrupted` on a stop, `ConfigError` when settings are wrong."""
        app = self._app
        config = app.config
        if config.health_port:
            try:
                serve(config.health_port, app.health, app.metrics, config.health_host)
            except OSError as exc:
                raise ConfigError([Problem("HEALTH_PORT", (
                    f"HEALTH_PORT {config.health_port} on HEALTH_HOST {config.health_host} cannot be served: "
                    f"{exc.strerror or exc} (another process holds it?)"))]) from None
            log.info("health endpoint listening", extra={"host": config.health_host, "port": config.health_port,
                                                         "paths": ["/healthz", "/metrics"]})
        scheduler = schedule.Scheduler()
        scheduler.every(config.poll_interval.total_seconds()).seconds.do(self.tick)
        scheduler.every(renew_interval(config.lease)).seconds.do(self.watch_lease)
        log.info("connector started", extra={"cursor": iso_hour(app.syncer.plan().cursor),
                                             "poll_interval_s": config.poll_interval.total_seconds()})
        self.tick()
        while not app.stopper.event.is_set():
            scheduler.run_pending()
            idle = scheduler.idle_seconds
            app.stopper.sleep(min(idle if idle is not None else 1.0, 5.0))
        raise Interrupted("stop requested")

    def tick(self) -> None:
        app = self._app
        if self._retry_at and app.local_clock() < self._retry_at:
            app.health.beat(self._last_error())
            return
        try:
            self._hold_lease()
            app.syncer.sync_due()
            self._succeeded()  # inside the try: with PostgreSQL its reads can fail too
        except Interrupted:
            raise
        except LeaseLost as exc:
            self._stand_by(exc)
        except ConfigError as exc:
            now = app.local_clock()
            self._config_error_since = self._config_error_since or now
            if now - self._config_error_since >= CONFIG_GRACE:
                raise
            self._failed(exc)
        except Exception as exc:  # noqa: BLE001 - the loop must outlive a bug in one tick
            self._failed(exc)
        app.metrics.last_tick.set(app.local_clock().timestamp())

    def verify(self) -> None:
        """Read back delivered hours past their grace period; repair the short ones, a bounded
        number of times with backoff (grace x 2^repairs). Never ends the loop: the read-back is
        a check, and a failing check is logged and counted (`/metrics`), not fatal."""
        app = self._app
        verifier = app.verifier
        if verifier is None:
            return
        try:
            now = app.clock()
            known = app.store.verdicts()
            todo = [d for d in app.store.deliveries() if now - d.delivered_at >= verifier.grace
                    and _needs_look(known.get(d.hour), now, verifier.grace)]
            verdicts = verifier.verify(todo)
            app.store.record_verdicts(verdicts)
            for v in verdicts:
                if v.state != "short":
                    continue
                if v.repairs < app.config.repair_attempts:
                    log.warning("hour short in PostHog; repairing", extra={
                        "hour": iso_hour(v.hour), "missing": v.missing, "delivered": v.delivered, "repair": v.repairs + 1})
                    app.syncer.redeliver([v.hour])
                    verifier.mark_repaired([v.hour])
                else:
                    log.error("hour still short in PostHog after repairs", extra={
                        "hour": iso_hour(v.hour), "missing": v.missing, "repairs": v.repairs})
        except Interrupted:
            raise
        except Exception as exc:  # noqa: BLE001 - a failing read-back must not stop the import
            app.metrics.errors.labels(f"verify:{type(exc).__name__}").inc()
            log.error("verify failed", extra={"error": f"{type(exc).__name__}: {exc}"})
        self._show_verification()

    def _show_verification(self) -> None:
        app = self._app
        verdicts = app.store.verdicts().values()
        for state in ("whole", "short", "pending"):
            app.metrics.hours_verified.labels(state).set(sum(v.state == state for v in verdicts))
        app.metrics.events_missing.set(sum(v.missing for v in verdicts if v.state == "short"))

    def _succeeded(self) -> None:
        app = self._app
        if self._failures:
            app.store.record_error(None)
        self._failures, self._retry_at, self._config_error_since = 0, None, None
        app.health.beat(None)
        self.verify()
        plan = app.syncer.plan()
        if plan.finished and not self._announced_end:
            self._announced_end = True
            log.info("END_DATE reached: every hour before it is delivered; idling",
                     extra={"end": iso_hour(plan.cursor)})

    def watch_lease(self) -> None:
        """A standby's poll, every lease/3: tick, which takes the lease if it is free now."""
        if self._standby:
            self.tick()

    def _hold_lease(self) -> None:
        state = require_lease(self._app.store)  # raises LeaseHeld: another connector works the sync
        if state.fence != self._announced_fence and state.expires_at is not None:
            self._announced_fence = state.fence
            log.info("lease acquired: this connector works the sync",
                     extra={"sync": state.sync, "holder": state.holder, "fence": state.fence,
                            "takeover": self._standby, "takeovers": state.takeovers})
        self._standby, self._standby_holder = False, None

    def _stand_by(self, exc: LeaseLost) -> None:
        app = self._app
        state = app.store.lease_state()
        if not self._standby or state.holder != self._standby_holder:
            log.log(logging.INFO if isinstance(exc, LeaseHeld) else logging.WARNING,
                    "standby: another connector works this sync; taking over when its lease runs out",
                    extra={"sync": state.sync, "holder": state.holder,
                           "lease_expires_at": state.expires_at.isoformat() if state.expires_at else None,
                           "poll_s": round(renew_interval(app.config.lease), 1), "reason": str(exc)})
        self._standby, self._standby_holder = True, state.holder
        self._failures, self._retry_at, self._config_error_since = 0, None, None
        app.health.beat(None)  # a standby is healthy: it is doing its job

    def _last_error(self) -> str | None:
        try:
            return self._app.store.last_error()
        except ConnectorError as exc:  # a PostgreSQL store may be unreachable right now
            return f"{type(exc).__name__}: {exc}"

    def _failed(self, exc: Exception) -> None:
        app = self._app
        if not isinstance(exc, ConnectorError):
            log.exception("unexpected error in a sync tick")
        self._failures += 1
        app.metrics.errors.labels(type(exc).__name__).inc()
        delay = min(app.config.poll_interval * 2 ** (self._failures - 1), MAX_BACKOFF)
        self._retry_at = app.local_clock() + delay
        message = f"{type(exc).__name__}: {exc}"
        log.error("sync failed; retrying later",
                  extra={"error": message, "failures": self._failures, "retry_at": self._retry_at.isoformat()})
        try:
            app.store.record_error(message)
        except ConnectorError:
            log.exception("cannot record the error in the state store")
        app.health.beat(message)


def _needs_look(verdict, now: datetime, grace: timedelta) -> bool:
    """Whether an hour (past its grace period) should be read back now."""
    if verdict is None or verdict.state == "pending":
        return True
    if verdict.state == "whole":
        return False
    # Short: look again, repaired or not, after a wait that doubles with each repair.
    return now - verdict.checked_at >= grace * 2 ** verdict.repairs
