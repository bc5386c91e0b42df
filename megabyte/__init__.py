"""MEGABYTE byte-level language model: ``from megabyte import MegabyteConfig, Megabyte``."""
from .config import MegabyteConfig
from .model import Megabyte, MegabyteOutput

__all__ = ["Megabyte", "MegabyteConfig", "MegabyteOutput"]
