"""Privacy analysis: epsilon of composed releases (RDP / PRV / exact) and calibration.

Pure functions over Opacus' accountants (no FLARE import); see docs/privacy-model.md.
"""

from .calibrate import calibrate, calibrate_noise_multiplier
from .epsilon import (
    ACCOUNTANTS,
    MAX_NOISE_MULTIPLIER,
    MECHANISMS,
    PRV_MIN_NOISE_MULTIPLIER,
    RdpSearch,
    epsilon_exact,
    epsilon_gaussian,
    epsilon_prv,
    epsilon_rdp,
    group_history,
    grouped_history,
    history_epsilon_prv,
    history_epsilon_rdp,
    history_rdp,
    rdp_to_epsilon,
)

__all__ = [
    "ACCOUNTANTS",
    "MAX_NOISE_MULTIPLIER",
    "MECHANISMS",
    "PRV_MIN_NOISE_MULTIPLIER",
    "RdpSearch",
    "calibrate",
    "calibrate_noise_multiplier",
    "epsilon_exact",
    "epsilon_gaussian",
    "epsilon_prv",
    "epsilon_rdp",
    "group_history",
    "grouped_history",
    "history_epsilon_prv",
    "history_epsilon_rdp",
    "history_rdp",
    "rdp_to_epsilon",
]
