"""Test-only FLARE components (never shipped in the package or a job users get).

:class:`SeededADPFilter` is the site's ADPFilter with fixed noise, injected through the
pure layer's generator factory. Unit tests construct it directly; a simulator test that
needs fixed noise copies this file into its job's ``app/custom/`` folder (FLARE's BYOC) or
puts ``tests/`` on the site's PYTHONPATH and names ``seeded_filter.SeededADPFilter``.
"""

from adpfl.flare.privacy_filter import ADPFilter
from adpfl.privacy.mechanisms import seeded_generators


class SeededADPFilter(ADPFilter):
    def __init__(self, noise_seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        self._generator_factory = seeded_generators(noise_seed)
