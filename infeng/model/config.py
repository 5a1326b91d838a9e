"""Kept for ``infeng.runtime.kv``, which imports ModelConfig from here: the class lives in
``infeng.format.config`` (converters, below the model layer, build it)."""
from infeng.format.config import ModelConfig

__all__ = ["ModelConfig"]
