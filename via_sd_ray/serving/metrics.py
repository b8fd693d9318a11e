"""Prometheus metrics through ``ray.util.metrics`` (exported by every Ray node's metrics agent).

Router side: blocks per tier, proposed / accepted / committed tokens, acceptance per
block position (``via_sd_position_accepted_total / via_sd_position_proposed_total``),
escalations, tier retries, tokens/s per generation. Tier side: call latency, batch
size, KV-cache hits and rebuilds, KV slots (used / prefix / free / waiting),
refusals, preemptions and prefix tokens reused.
"""

from __future__ import annotations

from ray.util.metrics import Counter, Gauge, Histogram

LATENCY_MS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000]


class TierMetrics:
    def __init__(self):
        self.latency = Histogram("via_sd_tier_latency_ms", "Tier call latency seen by the replica (queue + "
                                 "forward), ms.", boundaries=LATENCY_MS, tag_keys=("tier",))
        self.batch = Histogram("via_sd_tier_batch_size", "Generations per tier forward pass.",
                               boundaries=[1, 2, 4, 8, 16, 32, 64], tag_keys=("tier",))
        self.cache = Counter("via_sd_cache_events_total", "KV-cache hits and rebuilds (a call that found no "
                             "cache for its generation) per tier.", tag_keys=("tier", "event"))

        self.slots = Gauge("via_sd_kv_slots", "KV pool slots of the replica: used (running or admitted "
                           "generations), prefix (finished, kept for reuse), free; and waiting (generations queued "
                           "for a slot).", tag_keys=("tier", "state"))
        self.slot_events = Counter("via_sd_kv_slot_events_total", "Admission and KV events per tier: refused (429), "
                                   "preemption (a running generation's cache lost; stays 0), prefix_tokens (prefill "
                                   "saved by prefix reuse).", tag_keys=("tier", "event"))

    def set_slots(self, tier: str, counts: dict[str, int], waiting: int) -> None:
        for state in ("used", "prefix", "free"):
            self.slots.set(counts.get(f"slots_{state}", 0), tags={"tier": tier, "state": state})
        self.slots.set(waiting, tags={"tier": tier, "state": "waiting"})

    def count_slot_events(self, tier: str, events: dict[str, int]) -> None:
        for event, n in events.items():
            if n:
                self.slot_events.inc(n, tags={"tier": tier, "event": event})

    def observe_call(self, tier: str, seconds: float) -> None:
        self.latency.observe(seconds * 1000, tags={"tier": tier})

    def observe_batch(self, tier: str, size: int) -> None:
        self.batch.observe(size, tags={"tier": tier})

    def count_cache(self, tier: str, hits: int, rebuilds: int) -> None:
        if hits:
            self.cache.inc(hits, tags={"tier": tier, "event": "hit"})
        if rebuilds:
            self.cache.inc(rebuilds, tags={"tier": tier, "event": "rebuild"})


class RouterMetrics:
    def __init__(self):
        self.blocks = Counter("via_sd_blocks_total", "Blocks decided per tier.", tag_keys=("tier",))
        self.committed = Counter("via_sd_committed_tokens_total", "Tokens committed per deciding tier.",
                                 tag_keys=("tier",))
        self.proposed = Counter("via_sd_proposed_tokens_total", "Draft tokens proposed.")
        self.accepted = Counter("via_sd_accepted_tokens_total", "Draft tokens committed at their own position.")
        self.position_proposed = Counter("via_sd_position_proposed_total", "Blocks with a draft token at a "
                                         "position.", tag_keys=("position",))
        self.position_accepted = Counter("via_sd_position_accepted_total", "Blocks whose draft token at a "
                                         "position was accepted.", tag_keys=("position",))
        self.escalations = Counter("via_sd_escalations_total", "Blocks the slim verifier escalated.")
        self.retries = Counter("via_sd_tier_retries_total", "Tier calls retried after a replica failure.",
                               tag_keys=("tier",))
        self.tier_latency = Histogram("via_sd_router_tier_latency_ms", "Tier call latency seen by the router "
                                      "(round trip), ms.", boundaries=LATENCY_MS, tag_keys=("tier",))
        self.tokens_per_s = Histogram("via_sd_generation_tokens_per_second", "Completion tokens per second of "
                                      "each finished generation.", boundaries=[1, 2, 5, 10, 20, 50, 100, 200, 500])
        self.generations = Counter("via_sd_generations_total", "Finished generations.",
                                   tag_keys=("mode", "finish_reason"))

    def record_block(self, record) -> None:
        tier = getattr(record.tier, "value", record.tier)
        self.blocks.inc(tags={"tier": tier})
        if record.committed:
            self.committed.inc(record.committed, tags={"tier": tier})
        if record.proposed:
            self.proposed.inc(record.proposed)
        if record.accepted:
            self.accepted.inc(record.accepted)
        for pos in range(record.proposed):
            self.position_proposed.inc(tags={"position": str(pos)})
            if pos < record.accepted:
                self.position_accepted.inc(tags={"position": str(pos)})
        if record.escalated:
            self.escalations.inc()

    def observe_tier(self, tier: str, seconds: float) -> None:
        self.tier_latency.observe(seconds * 1000, tags={"tier": tier})

    def finish(self, mode: str, finish_reason: str, tokens: int, seconds: float) -> None:
        self.generations.inc(tags={"mode": mode, "finish_reason": finish_reason})
        if seconds > 0:
            self.tokens_per_s.observe(tokens / seconds)
