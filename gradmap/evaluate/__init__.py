"""Evaluation exactly as the layer-pruning papers report it: perplexity, zero-shot accuracy
and LAMBADA (beside the zero-shot average)."""
from gradmap.evaluate.intervals import wilson_interval
from gradmap.evaluate.perplexity import PerplexityReport, perplexity, perplexity_report
from gradmap.evaluate.tasks import PROBE_NAMES, TASK_NAMES, TASKS
from gradmap.evaluate.zero_shot import loglikelihoods, zero_shot

__all__ = ["PerplexityReport", "PROBE_NAMES", "TASKS", "TASK_NAMES", "loglikelihoods",
           "perplexity", "perplexity_report", "wilson_interval", "zero_shot"]
