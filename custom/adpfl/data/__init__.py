"""Data layer: synthetic federated sites, datalist loading/validation, public-dataset adapters.

Conventions: a site's data lives in ``<data_root>/<site_name>/`` with a MONAI-style
``datalist.json`` (``task``, ``site``, ``training``, ``validation``, ``meta``; paths relative
to the datalist folder).  Task facts (channels, files per case, mask values) come from the
task registry :mod:`adpfl.tasks`; see ``common`` for the site-index rule.
"""

from .common import BRAIN_MODALITIES, site_index
from .datalist import check_pair, load_site_datalist, validate_site
from .errors import DataError, DataWarning
from .public import prepare_public_dataset, split_sites
from .synthetic import domain_shift, ensure_site_data, generate_site

__all__ = [
    "BRAIN_MODALITIES",
    "DataError",
    "DataWarning",
    "check_pair",
    "domain_shift",
    "ensure_site_data",
    "generate_site",
    "load_site_datalist",
    "prepare_public_dataset",
    "site_index",
    "split_sites",
    "validate_site",
]
