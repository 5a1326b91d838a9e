"""`infeng serve`: an OpenAI-compatible HTTP server over the one Engine (FastAPI + uvicorn).

Installed with the ``serve`` extra; ``require()`` names it when a package is missing.
"""
from __future__ import annotations

from infeng.errors import InfengError


def require() -> None:
    missing = []
    for mod in ("fastapi", "uvicorn", "prometheus_client"):
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    if missing:
        raise InfengError(f"infeng serve needs {', '.join(missing)}: pip install 'infeng[serve]'")
