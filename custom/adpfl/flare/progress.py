"""Server widget that records how far a run got, so a stopped run can be resumed.

After every round, once ScatterAndGather has persisted the new global model (it saves
before it fires ``ROUND_DONE``), the widget atomically rewrites ``run_progress.json`` in
the job's run folder::

    {"format": "adpfl-run-progress", "job_id": ..., "last_completed_round": k,
     "start_round": s, "num_rounds": N, "model": "<app_server>/FL_global_model.pt", ...}

plus ``history``: per completed round, each site's validation Dice of the global model
it received that round (the ``INITIAL_METRICS`` of its result) and the time, and
``settings``: what the job was configured with (image size, data, privacy settings; read
by ``adpfl run``'s round printer and ``adpfl export``'s privacy card).

``N`` is the run's total plan (rounds 0 .. N-1); ``adpfl`` resume tooling
(:mod:`adpfl.flare.resume`) reads this file to restart at round ``k + 1`` from that
model. FLARE 2.9 itself cannot resume a job: its component snapshots are disabled
(``persist_components`` is a no-op) and the simulator deletes its workspace at start.
"""

from __future__ import annotations

import os
import time

from nvflare.apis.dxo import MetaKey, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.app_constant import AppConstants, DefaultCheckpointFileName
from nvflare.app_common.app_event_type import AppEventType
from nvflare.widgets.widget import Widget

from adpfl._io import write_json_atomic

PROGRESS_FILE = "run_progress.json"
PROGRESS_FORMAT = "adpfl-run-progress"


class RunProgressWidget(Widget):
    def __init__(self, task: str = "", mode: str = "", num_rounds: int = 0, start_round: int = 0,
                 settings: dict | None = None):
        """Args:
        task, mode: what the job trains (written into the progress file).
        num_rounds: the run's total planned rounds (rounds ``0 .. num_rounds-1``).
        start_round: the round this job started at (> 0 for a resumed run).
        settings: the job's settings, copied into the progress file as they are.
        """
        super().__init__()
        if int(num_rounds) < 1 or not 0 <= int(start_round) < int(num_rounds):
            raise ValueError(
                f"need 0 <= start_round < num_rounds, got start_round={start_round}, num_rounds={num_rounds}"
            )
        self.task = task
        self.mode = mode
        self.num_rounds = int(num_rounds)
        self.start_round = int(start_round)
        self.settings = dict(settings or {})
        self._dice: dict[int, dict[str, float]] = {}
        self._history: list[dict] = []
        self._started: float | None = None
        self._run_dir: str | None = None
        self._app_dir: str | None = None

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        if event_type == EventType.START_RUN:
            ws = fl_ctx.get_engine().get_workspace()
            job_id = fl_ctx.get_job_id()
            self._run_dir = ws.get_run_dir(job_id)
            self._app_dir = ws.get_app_dir(job_id)
            self._started = time.time()
        elif event_type == AppEventType.BEFORE_CONTRIBUTION_ACCEPT:
            self._on_contribution(fl_ctx)
        elif event_type == AppEventType.ROUND_DONE and self._run_dir:
            current_round = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
            if current_round is None:
                return
            progress = {
                "format": PROGRESS_FORMAT,
                "job_id": fl_ctx.get_job_id(),
                "task": self.task,
                "mode": self.mode,
                "last_completed_round": int(current_round),
                "start_round": self.start_round,
                "num_rounds": self.num_rounds,
                "model": os.path.join(self._app_dir, DefaultCheckpointFileName.GLOBAL_MODEL),
                "best_model": os.path.join(self._app_dir, DefaultCheckpointFileName.BEST_GLOBAL_MODEL),
                "time": time.time(),
                "started": self._started,
                "settings": self.settings,
            }
            dice = self._dice.pop(int(current_round), {})
            self._history.append({"round": int(current_round), "dice": dict(sorted(dice.items())),
                                  "time": progress["time"]})
            progress["history"] = self._history
            write_json_atomic(os.path.join(self._run_dir, PROGRESS_FILE), progress)

    def _on_contribution(self, fl_ctx: FLContext) -> None:
        """Keep the site's validation Dice of the global model it trained from this round."""
        result = fl_ctx.get_prop(AppConstants.TRAINING_RESULT)
        current_round = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
        if result is None or current_round is None:
            return
        site = result.get_peer_prop(ReservedKey.IDENTITY_NAME, None)
        try:
            value = from_shareable(result).get_meta_prop(MetaKey.INITIAL_METRICS)
        except Exception:  # not a DXO: the contribution checks reject it; nothing to record
            return
        if site and isinstance(value, (int, float)):
            self._dice.setdefault(int(current_round), {})[site] = float(value)
