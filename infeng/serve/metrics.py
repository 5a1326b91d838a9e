"""The server's Prometheus metrics (one registry per server, so tests can run several)."""
from __future__ import annotations

try:    # the serve extra; infeng.serve.require() names it when missing
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
except ImportError:
    pass

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("infeng_requests", "HTTP requests answered, by endpoint, model and status",
                                ["endpoint", "model", "status"], registry=r)
        self.prompt_tokens = Counter("infeng_prompt_tokens", "prompt tokens of finished requests", ["model"], registry=r)
        self.generation_tokens = Counter("infeng_generation_tokens", "tokens generated", ["model"], registry=r)
        self.ttft = Histogram("infeng_time_to_first_token_seconds", "arrival to first token", ["model"],
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("infeng_inter_token_latency_seconds", "time between tokens of one sequence", ["model"],
                             buckets=TOKEN_BUCKETS, registry=r)
        self.e2e = Histogram("infeng_e2e_request_latency_seconds", "arrival to last token", ["model"],
                             buckets=LATENCY_BUCKETS, registry=r)
        self.rejected = Counter("infeng_rejected", "requests refused by admission control (429)", ["reason"], registry=r)
        self.cancelled = Counter("infeng_cancelled", "sequences cancelled because their client went away", registry=r)
        self.queue_depth = Gauge("infeng_queue_depth", "requests waiting for the engine", registry=r)
        self.running = Gauge("infeng_running_sequences", "sequences in the engine's batch", registry=r)
        self.kv_blocks = Gauge("infeng_kv_blocks_used", "KV cache blocks in use", registry=r)
        self.kv_blocks_total = Gauge("infeng_kv_blocks_total", "KV cache blocks in the pool", registry=r)
        self.prefix_hit_rate = Gauge("infeng_prefix_cache_hit_rate", "prompt blocks found in the prefix cache / looked up", registry=r)
        self.adapter_loads = Gauge("infeng_adapter_loads", "adapter loads since start", registry=r)
        self.adapter_evictions = Gauge("infeng_adapter_evictions", "adapters evicted to stay within the budget", registry=r)
        self.adapters_loaded = Gauge("infeng_adapters_loaded", "adapters loaded now", registry=r)
        self.engine_info = Gauge("infeng_engine_info", "the engine's settings (value 1): KV cache types, speculation",
                                 ["kv_dtype", "kv_rotated", "speculate"], registry=r)
        self.spec_drafted = Gauge("infeng_spec_drafted_tokens", "draft tokens verified since start", registry=r)
        self.spec_accepted = Gauge("infeng_spec_accepted_tokens", "of the draft tokens verified, those accepted", registry=r)
        self.loads = 0

    def describe(self, engine) -> None:
        """The engine's fixed settings, once it has loaded."""
        s = settings(engine)
        self.engine_info.labels(s["kv_cache_dtype"], str(s["kv_cache_rotated"]).lower(), s["speculate"]).set(1)

    def engine_step(self, engine, _dt: float) -> None:
        """Engine gauges, set on the engine thread after each step (prometheus-client is thread-safe)."""
        waiting, running = engine.occupancy
        kv = engine.kv
        self.queue_depth.set(waiting)
        self.running.set(running)
        self.kv_blocks.set(kv.blocks_used())
        self.prefix_hit_rate.set(kv.hits / kv.lookups if kv.lookups else 0.0)
        self.adapter_evictions.set(engine.adapters.evictions)
        self.adapters_loaded.set(len(engine.adapters.loaded))
        if engine.spec is not None:
            self.spec_drafted.set(engine.spec.stats.drafted)
            self.spec_accepted.set(engine.spec.stats.accepted)

    def text(self) -> bytes:
        return generate_latest(self.registry)


def settings(engine) -> dict:
    """What /v1/models and /metrics say about how the engine runs: the KV cache's types (one label,
    per layer when hybrid), whether keys are rotated, and the speculation (off, lookup or draft,
    with its fixed length or 'adaptive')."""
    spec = engine.spec.cfg if engine.spec is not None else None
    how = "off" if spec is None else f"{spec.drafter}:{spec.k if spec.k is not None else 'adaptive'}"
    return {"kv_cache_dtype": engine.kv.spec.describe(), "kv_cache_rotated": engine.kv.spec.rotated, "speculate": how}
