"""In-process stand-ins for the Ray side of the serving floor.

``LocalTierClient`` speaks the protocol of ``router.TierClient`` (``draft``, ``verify``,
``release``) but answers with a ``TierServer`` in this process. Like a Ray handle, it
pickles every call and reply, so nothing shared by reference can hide a bug. It can be
told to fail: ``failures`` are raised, in order, by the next calls; ``gate`` holds calls
until it is set.
"""

from __future__ import annotations

import asyncio
import pickle
from dataclasses import dataclass, field

from via_sd_ray.config import EngineConfig
from via_sd_ray.models.decoder import DecoderStack
from via_sd_ray.models.runner import TierRunner
from via_sd_ray.models.tiers import tier_runner
from via_sd_ray.serving.tiers import TierServer

TIERS = ("drafter", "slim", "full")


def fresh_runners(engine, config: EngineConfig | None = None) -> dict[str, TierRunner]:
    """New tier runners (empty caches) over the models a ``LocalEngine`` already loaded."""
    config = config or engine.config
    return {
        "drafter": tier_runner(DecoderStack(engine.drafter_model), config, "drafter"),
        "slim": tier_runner(DecoderStack(engine.verifier_model, config.slim.layers), config, "slim"),
        "full": tier_runner(DecoderStack(engine.verifier_model), config, "full"),
    }


@dataclass
class LocalTierClient:
    server: TierServer
    failures: list[BaseException | None] = field(default_factory=list)  # raised by the next calls, in order
    always: BaseException | None = None  # raised by every call
    gate: asyncio.Event | None = None  # calls wait for it
    hang_first_s: float = 0.0  # the first call sleeps this long before answering (a stuck replica)
    calls: int = 0  # draft and verify calls received, failed ones included
    released: list[str] = field(default_factory=list)

    async def draft(self, call):
        return await self._call(self.server.draft, call)

    async def verify(self, call):
        return await self._call(self.server.verify, call)

    async def release(self, generation_id: str) -> None:
        self.released.append(generation_id)
        await self.server.release(generation_id)

    async def _call(self, method, call):
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.always is not None:
            raise self.always
        if self.failures and (failure := self.failures.pop(0)) is not None:  # None: this call succeeds
            raise failure
        if self.hang_first_s and self.calls == 1:
            await asyncio.sleep(self.hang_first_s)
        reply = await method(pickle.loads(pickle.dumps(call)))
        return pickle.loads(pickle.dumps(reply))


def local_tiers(engine, config: EngineConfig | None = None) -> dict[str, LocalTierClient]:
    """One client per tier, each over its own ``TierServer`` with fresh runners."""
    config = config or engine.config
    runners = fresh_runners(engine, config)
    return {tier: LocalTierClient(TierServer(config, tier, runner=runners[tier], metrics=None)) for tier in TIERS}


def shutdown(clients: dict[str, LocalTierClient]) -> None:
    for client in clients.values():
        client.server.batcher.shutdown()
