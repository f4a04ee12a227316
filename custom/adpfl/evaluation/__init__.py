"""Empirical privacy evaluation: gradient-inversion attack and distinguishing-game audit."""

from adpfl.evaluation.attack import AttackConfig, AttackResult, attack_release, image_metrics, invert_gradient
from adpfl.evaluation.audit import AuditResult, audit_gaussian_release, epsilon_lower_bound

__all__ = [
    "AttackConfig",
    "AttackResult",
    "AuditResult",
    "attack_release",
    "audit_gaussian_release",
    "epsilon_lower_bound",
    "image_metrics",
    "invert_gradient",
]
