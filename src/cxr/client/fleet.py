"""A fleet of Triton replicas behind one transport: least-loaded routing, failover, and probing back in.

``--url A,B,C`` (a comma list) anywhere a URL is taken makes a
:class:`FleetTransport`. Each request goes to the healthy replica with the
fewest requests in flight (ties: the one used least recently). A replica whose
request fails with a transient error (unavailable, deadline, overload) is taken
out, and the request is retried on another replica at once; a replica that is
out is probed (``ready``) again after a cooldown that doubles from 1 s to 30 s,
and comes back when it answers. Every replica must serve the same model file
(same sha256), so results do not depend on which one answered.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from cxr.client.transport import ModelInfo, Scores, Transport
from cxr.core.errors import RetryableServerError, ServerError

logger = logging.getLogger(__name__)

PROBE_FIRST_S = 1.0
PROBE_MAX_S = 30.0


def split_urls(url: str | None) -> list[str]:
    """``"a:1, b:2"`` -> ``["a:1", "b:2"]``; one URL gives a list of one."""
    return [u.strip() for u in (url or "").split(",") if u.strip()]


@dataclass
class _Replica:
    url: str
    transport: Transport | None = None
    in_flight: int = 0
    healthy: bool = True
    next_probe: float = 0.0
    cooldown: float = PROBE_FIRST_S
    last_used: float = 0.0
    served: int = 0
    failures: int = 0


class FleetTransport(Transport):
    """Several replicas behind one :class:`Transport` (thread-safe)."""

    def __init__(self, urls: list[str], connect: Callable[[str], Transport]) -> None:
        if len(urls) < 2:
            raise ValueError("a fleet needs at least two URLs")
        if len(set(urls)) != len(urls):
            raise ValueError(f"duplicate replica URLs in {urls}")
        self._connect = connect
        self._lock = threading.Lock()
        self.replicas = [_Replica(u) for u in urls]
        errors = []
        for r in self.replicas:
            try:
                r.transport = connect(r.url)
            except ServerError as exc:
                self._mark_down(r, exc)
                errors.append(str(exc))
        up = [r for r in self.replicas if r.transport is not None]
        if not up:
            raise RetryableServerError(f"no replica of {urls} answered: {'; '.join(errors)}")
        infos = {r.url: r.transport.info for r in up}  # type: ignore[union-attr]
        shas = {i.sha256 for i in infos.values()}
        if len(shas) != 1 or len({(i.name, i.version, i.threshold, i.ood_threshold) for i in infos.values()}) != 1:
            raise ServerError(f"the replicas do not serve the same model: {infos}")
        self.info: ModelInfo = next(iter(infos.values()))

    # -- routing -------------------------------------------------------------------------------------------------
    def _mark_down(self, r: _Replica, exc: Exception) -> None:
        with self._lock:
            if r.healthy:
                logger.warning("replica %s taken out: %s", r.url, str(exc).splitlines()[0])
            r.healthy = False
            r.failures += 1
            r.next_probe = time.monotonic() + r.cooldown
            r.cooldown = min(r.cooldown * 2, PROBE_MAX_S)

    def _probe(self, r: _Replica) -> None:
        """Bring a replica back if it answers (called outside the lock)."""
        try:
            if r.transport is None:
                r.transport = self._connect(r.url)
            ok = r.transport.ready()
        except ServerError:
            ok = False
        with self._lock:
            if ok:
                logger.info("replica %s back in", r.url)
                r.healthy, r.cooldown = True, PROBE_FIRST_S
            else:
                r.next_probe = time.monotonic() + r.cooldown
                r.cooldown = min(r.cooldown * 2, PROBE_MAX_S)

    def _pick(self, exclude: set[str]) -> _Replica | None:
        now = time.monotonic()
        due = []
        with self._lock:
            for r in self.replicas:
                if not r.healthy and now >= r.next_probe and r.url not in exclude:
                    r.next_probe = now + r.cooldown  # one prober at a time
                    due.append(r)
        for r in due:
            self._probe(r)
        with self._lock:
            candidates = [r for r in self.replicas if r.healthy and r.transport is not None and r.url not in exclude]
            if not candidates:
                return None
            best = min(candidates, key=lambda r: (r.in_flight, r.last_used))
            best.in_flight += 1
            best.last_used = now
            return best

    def infer(self, batch: np.ndarray, *, timeout_s: float, priority: int = 0) -> Scores:
        tried: set[str] = set()
        last: Exception | None = None
        while True:
            r = self._pick(tried)
            if r is None:
                raise RetryableServerError(f"no healthy replica left (tried {sorted(tried)}): {last}")
            tried.add(r.url)
            try:
                out = r.transport.infer(batch, timeout_s=timeout_s, priority=priority)  # type: ignore[union-attr]
            except RetryableServerError as exc:
                last = exc
                self._mark_down(r, exc)
                continue  # in-flight work moves to another replica
            finally:
                with self._lock:
                    r.in_flight -= 1
            with self._lock:
                r.served += len(batch)
            return out

    def ready(self) -> bool:
        return any(r.transport is not None and r.transport.ready() for r in self.replicas)

    def server_metadata(self) -> dict:
        return {r.url: {"healthy": r.healthy, "served_images": r.served, "failures": r.failures} for r in self.replicas}

    def close(self) -> None:
        for r in self.replicas:
            if r.transport is not None:
                r.transport.close()
