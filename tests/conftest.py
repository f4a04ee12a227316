import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

# Modules that start whole FLARE systems (POC / provisioned kits): they share the machine's
# ports, processes and the admin clients' global state, so they never run at the same time.
_SYSTEM_MODULE_WORDS = ("poc", "kits", "provision")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Group tests for ``pytest -n 2 --dist loadgroup`` (the README's test command):
    a module's tests stay on one worker, so a module-scoped simulator/POC run is set up
    once, not once per worker; the system-starting modules form one group, run one after
    the other. Without xdist the marks are inert."""
    for item in items:
        module = item.nodeid.split("::", 1)[0]
        name = os.path.basename(module)
        group = "flare-systems" if any(w in name for w in _SYSTEM_MODULE_WORDS) else module
        item.add_marker(pytest.mark.xdist_group(group))
