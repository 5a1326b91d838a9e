"""infeng: a CPU-first inference engine for Llama-family models.

    from infeng import Engine, Request, SamplingParams
    engine = Engine.load("model.infeng", threads=2, kv_budget_mb=512, max_batch_tokens=512)
"""
__version__ = "0.1.0"

_EXPORTS = {"Engine": "infeng.runtime.engine", "Request": "infeng.runtime.engine",
            "Result": "infeng.runtime.engine", "TokenEvent": "infeng.runtime.engine",
            "FinishEvent": "infeng.runtime.engine", "SamplingParams": "infeng.runtime.sampler",
            "InfengError": "infeng.errors"}


def __getattr__(name):  # lazy, so `import infeng` stays cheap for the CLI and the kernels
    if name in _EXPORTS:
        import importlib
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'infeng' has no attribute {name!r}")
