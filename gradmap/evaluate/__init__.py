"""Evaluation exactly as the layer-pruning papers report it: perplexity and zero-shot accuracy."""
from .perplexity import PerplexityReport, perplexity, perplexity_report
from .tasks import TASK_NAMES, TASKS
from .zero_shot import loglikelihoods, zero_shot

__all__ = ["PerplexityReport", "TASKS", "TASK_NAMES", "loglikelihoods", "perplexity",
           "perplexity_report", "zero_shot"]
