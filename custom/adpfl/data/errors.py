"""Error and warning types of the data layer."""

from __future__ import annotations


class DataError(ValueError):
    """Raised for any problem with a site's data: missing/corrupt files, bad datalists,
    shape or label mismatches, unusable public-dataset layouts.

    The message always names the offending file, folder, case or setting so that a
    hospital operator can fix it without reading code.
    """


class DataWarning(UserWarning):
    """Emitted for suspicious but usable data (e.g. an all-background mask)."""
