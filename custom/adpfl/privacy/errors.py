"""Exceptions of the privacy core.

* :class:`PrivacyError` -- base class; also raised for unsafe inputs (non-finite values,
  a repeated release of the same round).
* :class:`BudgetExhausted` -- the next release would exceed the site's budget; nothing
  was released and the ledger is unchanged.
* :class:`PrivacyConfigError` -- an invalid or unreachable setting. It is also a
  :class:`ValueError`, so callers that catch ``ValueError`` see it too.
"""


class PrivacyError(Exception):
    """Base class of all privacy-core errors."""


class BudgetExhausted(PrivacyError):
    """The requested release would spend more than the site's privacy budget."""


class PrivacyConfigError(PrivacyError, ValueError):
    """A privacy setting is invalid or its target cannot be reached."""
