"""Privacy core of adp-fl (pure PyTorch + Opacus accountants; never imports nvflare).

See ``shared/design/privacy-model.md``. Main entry point: :class:`PrivacyPipeline`.
"""

from .accounting import (
    PrivacyLedger,
    calibrate_noise_multiplier,
    epsilon_gaussian,
    epsilon_prv,
    epsilon_rdp,
)
from .adaptive import AdaptiveClipper, effective_noise_multiplier, update_noise_multiplier_for
from .errors import BudgetExhausted, PrivacyConfigError, PrivacyError
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
from .pipeline import PrivacyConfig, PrivacyPipeline, SparseRelease
from .schedule import AdaptiveNoiseSchedule, FixedNoise

__all__ = [
    "AdaptiveClipper",
    "AdaptiveNoiseSchedule",
    "BudgetExhausted",
    "FixedNoise",
    "FlatSpec",
    "PrivacyConfig",
    "PrivacyConfigError",
    "PrivacyError",
    "PrivacyLedger",
    "PrivacyPipeline",
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
]
