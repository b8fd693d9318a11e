"""Readiness: when the application can serve, as ``/health``, ``grpc.health.v1.Health`` and probes see it.

Ready means every tier deployment (``Drafter``, ``SlimVerifier``, ``FullVerifier``) has a replica
that loaded its model and answered its warm-up call (``TierServer`` starts with one and only then
takes calls). The ``Router`` asks each tier (``TierServer.ready``), the ``Ingress`` asks the
``Router`` (``GenerationRouter.readiness``); every question has a time limit. Liveness is separate
and cheap: ``/livez`` answers while the ingress process runs.

Each question goes through a :class:`Readiness`, which adds two rules:

- a positive answer is kept for ``cache_s`` seconds (probes come every few seconds, from many places);
- once ready, a question that only times out keeps the answer: a saturated router or tier (every
  request slot busy with generations) is busy, not unready. A definite no (a tier reports a broken
  runner, a deployment is unavailable) makes it unready at once, and only a yes makes it ready again.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable

READY_CACHE_S = 5.0  # how long a positive answer stands
TIER_TIMEOUT_S = 2.0  # the router's wait for one tier's answer
ROUTER_TIMEOUT_S = 3.0  # the ingress's wait for the router's answer (which includes the tiers' waits)
WATCH_POLL_S = 1.0  # how often a gRPC Health/Watch stream looks again
WATCH_LIMIT_S = 600.0  # a Watch stream ends after this long (clients reconnect; replicas can drain)


class Readiness:
    """One readiness question with a time limit, a short memory of yes, and "busy is not unready".

    ``probe`` answers None when ready, else why not (it may also raise: that is a no, naming the error);
    ``name`` (what is asked) starts the reasons this class gives itself.
    """

    def __init__(self, probe: Callable[[], Awaitable[str | None]], timeout_s: float, name: str = "",
                 cache_s: float = READY_CACHE_S, clock: Callable[[], float] = time.monotonic):
        self.probe, self.timeout_s, self.cache_s, self.clock = probe, timeout_s, cache_s, clock
        self.prefix = f"{name}: " if name else ""
        self.ready = False  # the last definite answer
        self._ready_until = -math.inf

    async def check(self) -> str | None:
        """None when ready, else why not."""
        now = self.clock()
        if now < self._ready_until:
            return None
        try:
            reason = await asyncio.wait_for(self.probe(), self.timeout_s)
        except asyncio.TimeoutError:
            return None if self.ready else f"{self.prefix}no answer within {self.timeout_s:g} s (still starting)"
        except Exception as err:  # a dead or unavailable deployment: a definite no
            reason = f"{self.prefix}{type(err).__name__}: {err}"
        self.ready = reason is None
        if self.ready:
            self._ready_until = now + self.cache_s
        return reason


async def ask(response) -> object:
    """Await a Serve ``DeploymentResponse``, cancelling the request when the waiter gives up."""
    try:
        return await response
    except asyncio.CancelledError:
        response.cancel()
        raise

