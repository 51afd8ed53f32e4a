"""Readiness and the state of the backing stores, as /readyz and the metrics report them.

A process is ready once it can decide (config and policy loaded, first store connections made) and until
it starts draining after SIGTERM. The state of Postgres and Redis is reported but never makes a process
unready: an outage shared by every replica must not take them all out of service while cached keys and
fallbacks still answer.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Lifecycle:
    ready: bool = False  # start-up finished: stores connected, policy loaded
    draining: bool = False  # SIGTERM received: still serving, but asking to be taken out of rotation
