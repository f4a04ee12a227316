"""POC tooling (intermediate step of the split: everything still lives in processes.py)."""

from adpfl.poc.processes import *  # noqa: F401,F403
from adpfl.poc.processes import _live_pids, add_parser  # noqa: F401
