"""Prometheus metrics of one connector process, in a registry of its own."""

from __future__ import annotations

from typing import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from .hours import Plan
from .lease import LeaseState


class Metrics:
    """Counters and gauges the sync loop updates; `render()` is the /metrics body."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.events_read = Counter("connector_events_read", "Amplitude records read from exports", registry=r)
        self.events_sent = Counter("connector_events_sent", "Events PostHog accepted", registry=r)
        self.events_rejected = Counter(
            "connector_events_rejected", "Records rejected, by reason", ["reason"], registry=r
        )
        self.events_ignored = Counter("connector_events_ignored", "Records of ignored event types", registry=r)
        self.merges_sent = Counter("connector_merges_sent", "Device-to-user merges PostHog accepted", registry=r)
        self.merge_conflicts = Counter(
            "connector_merge_conflicts", "Device/user pairs not merged: device already linked to another user", registry=r
        )
        self.hours = Counter("connector_hours", "Hours finished, by outcome", ["outcome"], registry=r)
        self.export_bytes = Counter("connector_export_bytes", "Bytes of export archives downloaded", registry=r)
        self.errors = Counter("connector_errors", "Sync attempts that failed, by error (the cursor stayed)", ["error"],
                              registry=r)
        self.retries = Counter("connector_retries", "Retries, by service and cause", ["service", "cause"], registry=r)
        self.cursor = Gauge("connector_cursor_timestamp_seconds", "The cursor: first hour not yet delivered", registry=r)
        self.lag = Gauge("connector_lag_seconds", "Now minus the cursor", registry=r)
        self.backlog = Gauge("connector_backlog_hours", "Due hours not yet delivered", registry=r)
        self.clock_skew = Gauge("connector_clock_skew_seconds",
                                "How far each server's clock (its answers' Date) is ahead of this machine's",
                                ["server"], registry=r)
        self.hours_verified = Gauge("connector_hours_verified", "Delivered hours by their last read-back verdict",
                                    ["state"], registry=r)
        self.events_missing = Gauge("connector_events_missing",
                                    "Events PostHog does not hold, over hours still short after their repairs",
                                    registry=r)
        self.last_tick = Gauge("connector_last_tick_timestamp_seconds", "When the last sync tick finished", registry=r)
        for outcome in ("done", "empty", "failed"):
            self.hours.labels(outcome)

    def show(self, plan: Plan) -> None:
        """Set the gauges that describe the plan."""
        self.cursor.set(plan.cursor.timestamp())
        self.lag.set(plan.lag.total_seconds())
        self.backlog.set(plan.backlog)

    def watch_lease(self, lease_state: Callable[[], LeaseState]) -> None:
        """Show the sync's lease, read from `lease_state()` at every scrape."""
        self.registry.register(_LeaseCollector(lease_state))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _LeaseCollector:
    """The lease as the store last knew it: held or standby, holder, renewals, takeovers."""

    def __init__(self, lease_state: Callable[[], LeaseState]):
        self._lease_state = lease_state

    def collect(self) -> Iterator[Metric]:
        state = self._lease_state()
        held = GaugeMetricFamily("connector_lease_held", "1 while this connector holds its sync's lease, 0 as a standby",
                                 labels=["sync"])
        held.add_metric([state.sync], int(state.held))
        yield held
        info = GaugeMetricFamily("connector_lease_info", "The sync's lease: this connector's role and the holder it knows",
                                 labels=["sync", "role", "holder"])
        info.add_metric([state.sync, state.role, state.holder or ""], 1)
        yield info
        for name, help_text, value in (
            ("connector_lease_renewals", "Lease renewals by this connector", state.renewals),
            ("connector_lease_acquisitions", "Times this connector acquired the lease", state.acquisitions),
            ("connector_lease_takeovers", "Acquisitions of a lease another connector held and let run out (failovers)",
             state.takeovers),
        ):
            counter = CounterMetricFamily(name, help_text, labels=["sync"])
            counter.add_metric([state.sync], value)
            yield counter
