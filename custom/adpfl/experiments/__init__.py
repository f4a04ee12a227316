"""Experiments: comparison orchestration (``adpfl compare``: NP-FL vs DP-FL vs ADP-FL vs
DP-SGD in real simulator runs) and its report (``adpfl report``).

Kept apart from ``adpfl.evaluation``, which holds the empirical privacy evaluation (attack,
audit) that experiments and benchmarks call.
"""
