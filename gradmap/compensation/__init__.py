"""Compensators: repair hidden-state drift after layer removal by changing existing weights only."""
from .base import Compensator, PruneContext

__all__ = ["Compensator", "PruneContext"]
