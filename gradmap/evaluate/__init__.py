"""Evaluation exactly as the layer-pruning papers report it: perplexity and zero-shot accuracy."""
from gradmap.evaluate.perplexity import PerplexityReport, perplexity, perplexity_report
from gradmap.evaluate.tasks import TASK_NAMES, TASKS
from gradmap.evaluate.zero_shot import loglikelihoods, zero_shot

__all__ = ["PerplexityReport", "TASKS", "TASK_NAMES", "loglikelihoods", "perplexity",
           "perplexity_report", "zero_shot"]
