"""Privacy core of adp-fl (pure PyTorch + Opacus accountants; never imports FLARE).

See ``docs/privacy-model.md``. Main entry point: :class:`PrivacyPipeline`.
"""

from .adaptive import AdaptiveClipper, effective_noise_multiplier, update_noise_multiplier_for
from .analysis import calibrate_noise_multiplier, epsilon_gaussian, epsilon_prv, epsilon_rdp
from .config import DPSGDConfig, PrivacyConfig
from .errors import BudgetExhausted, PrivacyConfigError, PrivacyError
from .ledger import PrivacyLedger
from .mechanisms import (
    FlatSpec,
    add_gaussian_noise,
    add_laplace_noise,
    clip_l1,
    clip_l2,
    flatten_update,
    make_generator,
    sparsify_mask,
    unflatten_update,
)
from .pipeline import PrivacyPipeline, SparseRelease
from .record import RecordLedger
from .schedule import AdaptiveNoiseSchedule, FixedNoise

__all__ = [
    "AdaptiveClipper",
    "AdaptiveNoiseSchedule",
    "BudgetExhausted",
    "DPSGDConfig",
    "FixedNoise",
    "FlatSpec",
    "PrivacyConfig",
    "PrivacyConfigError",
    "PrivacyError",
    "PrivacyLedger",
    "PrivacyPipeline",
    "RecordLedger",
    "SparseRelease",
    "add_gaussian_noise",
    "add_laplace_noise",
    "calibrate_noise_multiplier",
    "clip_l1",
    "clip_l2",
    "effective_noise_multiplier",
    "update_noise_multiplier_for",
    "epsilon_gaussian",
    "epsilon_prv",
    "epsilon_rdp",
    "flatten_update",
    "make_generator",
    "sparsify_mask",
    "unflatten_update",
    "update_noise_multiplier_for",
]
