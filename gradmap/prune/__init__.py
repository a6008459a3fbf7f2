"""Layer pruning: importance metrics, compensators, and the `fast_prune` driver that runs them."""
from gradmap.prune.driver import fast_prune

__all__ = ["fast_prune"]
