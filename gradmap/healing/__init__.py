"""Healing a pruned model: a short top-K distillation towards the dense teacher, left as plain weights
(`gradmap.healing.distill`; what trains: `gradmap.healing.options.HEAL_MODES`)."""
from gradmap.healing.distill import HealReport, check_heal, heal
from gradmap.healing.options import HEAL_MODES, HealOptions, heal_options
from gradmap.healing.self_data import self_generated
from gradmap.healing.teacher import TeacherTargets, teacher_targets, topk_kl_sum

__all__ = ["heal", "HealReport", "check_heal", "HEAL_MODES", "HealOptions", "heal_options", "TeacherTargets",
           "teacher_targets", "topk_kl_sum", "self_generated"]
