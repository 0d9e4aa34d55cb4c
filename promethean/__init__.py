"""Promethean: train, adapt, remember and serve small language models on one modest machine."""

from promethean.config import ModelConfig, list_presets, load_preset
from promethean.errors import PrometheanError

__version__ = "0.1.0"
__all__ = ["ModelConfig", "PrometheanError", "list_presets", "load_preset", "__version__"]
