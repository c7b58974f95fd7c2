"""`GET /metrics`: the service in Prometheus's text format (prometheus_client).

Gauges are read from the database at scrape time (so they are right after a
restart and never drift): runs by state, and queued and running runs per
tenant. Wait (queued -> running) and run (running -> end) durations are
histograms observed as runs move, since this process started.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from .db import QUEUED, RUNNING, STATES, Database

BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, float("inf"))


class _FromDatabase(Collector):
    def __init__(self, db: Database) -> None:
        self.db = db

    def collect(self) -> Iterator[GaugeMetricFamily]:
        by_state = GaugeMetricFamily("pipcook_runs", "Runs known to the service, by state", labels=["state"])
        queued = GaugeMetricFamily("pipcook_queue_depth", "Queued runs per tenant", labels=["tenant"])
        running = GaugeMetricFamily("pipcook_running", "Running runs per tenant", labels=["tenant"])
        totals = dict.fromkeys(STATES, 0)
        tenants = {r["name"] for r in self.db.query("SELECT name FROM tenants")}
        counts: dict[tuple[str, str], int] = {}
        for tenant, state, n in self.db.iter_counts():
            totals[state] = totals.get(state, 0) + n
            counts[(tenant, state)] = n
            tenants.add(tenant)
        for state, n in totals.items():
            by_state.add_metric([state], n)
        for tenant in sorted(tenants):
            queued.add_metric([tenant], counts.get((tenant, QUEUED), 0))
            running.add_metric([tenant], counts.get((tenant, RUNNING), 0))
        yield by_state
        yield queued
        yield running


class Metrics:
    def __init__(self, db: Database) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_FromDatabase(db))
        self.wait = Histogram("pipcook_run_wait_seconds", "Time runs waited in the queue before starting",
                              ["tenant"], buckets=BUCKETS, registry=self.registry)
        self.duration = Histogram("pipcook_run_duration_seconds", "Time runs ran, from start to their end",
                                  ["tenant", "state"], buckets=BUCKETS, registry=self.registry)

    def started(self, run: dict[str, Any], at: float) -> None:
        self.wait.labels(run["tenant"]).observe(max(0.0, at - run["created"]))

    def finished(self, run: dict[str, Any], state: str, at: float) -> None:
        if run.get("started"):
            self.duration.labels(run["tenant"], state).observe(max(0.0, at - run["started"]))

    def render(self) -> bytes:
        return generate_latest(self.registry)
