"""A site process re-created between rounds continues its own state (optimizer moments,
previous global model, adaptive clip) instead of starting from scratch.

``nvflare simulator`` with fewer threads than sites starts a new process per task; before
this, such a run reset Adam's moments, the ADP noise schedules' progress signal and the
ADP-SGD adaptive clip every round, so it trained differently from a run with one thread per
site (and from the in-process comparison runner)."""

import warnings

import numpy as np
import pytest
import torch
from nvflare.apis.dxo import DXO, DataKind
from nvflare.apis.fl_constant import FLContextKey, ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.signal import Signal
from nvflare.app_common.app_constant import AppConstants

from adpfl.flare.executor import SegmentationExecutor
from adpfl.privacy.config import DPSGDConfig
from adpfl.privacy.public_signals import PUBLIC_INFO_PROP
from adpfl.tasks.network import TaskNetwork
from adpfl.training.loop import TrainConfig
from adpfl.training.site import SiteConfig, SiteSession

torch.set_num_threads(1)
warnings.filterwarnings("ignore")

TINY = dict(local_epochs=1, batch_size=3, image_size=32, device="cpu", amp=False)
ADPSGD = dict(target_epsilon=8.0, planned_rounds=3, adaptive=True, clip_learning_rate=0.5)


def _session(tmp_path, dpsgd: bool):
    cfg = SiteConfig(task="skin2d", num_train=6, num_val=2, dpsgd=dpsgd, hd95=False)
    dp = DPSGDConfig(**ADPSGD) if dpsgd else None
    s = SiteSession("site-1", cfg, TrainConfig(**TINY), dp)
    s.setup(str(tmp_path / "data"), ledger_folder=str(tmp_path / "ledgers"))
    return s


def _weights(s):
    return {k: v.detach().cpu().numpy().copy() for k, v in s.model.state_dict().items()}


@pytest.mark.parametrize("dpsgd", [False, True], ids=["local", "adpsgd"])
def test_session_state_round_trip(tmp_path, dpsgd):
    torch.manual_seed(0)
    a = _session(tmp_path, dpsgd)
    g0 = a.load_global(_weights(a), 0)
    a.train_round(g0, 0)
    state = a.state_dict()
    b = _session(tmp_path, dpsgd)  # the process that takes the next round
    b.load_state_dict(state)
    opt_a, opt_b = a.trainer.optimizer_for(a.model), b.trainer.optimizer_for(b.model)
    sa, sb = opt_a.state_dict()["state"], opt_b.state_dict()["state"]
    assert sa and set(sa) == set(sb)
    for i in sa:
        torch.testing.assert_close(sa[i]["exp_avg"], sb[i]["exp_avg"])
    if dpsgd:
        assert a.trainer.clip != pytest.approx(ADPSGD.get("max_grad_norm", 1.0))  # the clip moved
        assert b.trainer.clip == a.trainer.clip
        # the spend is the ledger's, never the saved state's
        assert b.trainer.history == a.record_ledger.history()
    # round 1's progress signal is computed against round 0's global model
    g1 = {k: v + 0.01 for k, v in g0.items()}
    b.load_global(g1, 1)
    assert b.public_info["global_change"] is not None and b.public_info["global_change"] > 0
    fresh = _session(tmp_path, dpsgd)
    fresh.load_global(g1, 1)
    assert fresh.public_info["global_change"] is None
    b.train_round(g1, 1)


def test_state_of_another_mode_or_network_is_refused(tmp_path):
    a = _session(tmp_path, dpsgd=False)
    a.load_global(_weights(a), 0)
    state = a.state_dict()
    with pytest.raises(ValueError, match="different mode"):
        _session(tmp_path, dpsgd=True).load_state_dict(state)
    bad = dict(state, prev_global={"x": torch.zeros(2)})
    with pytest.raises(ValueError, match="does not match"):
        _session(tmp_path, dpsgd=False).load_state_dict(bad)


class _Workspace:
    def __init__(self, root):
        self.root = root

    def get_root_dir(self):
        return self.root


class _Engine:
    def __init__(self, root):
        self.ws = _Workspace(root)

    def get_workspace(self):
        return self.ws

    def fire_event(self, event_type, fl_ctx):
        pass


def _ctx(root, job="job-1"):
    ctx = FLContext()
    ctx.set_prop(ReservedKey.IDENTITY_NAME, "site-1", private=False, sticky=True)
    ctx.set_prop(ReservedKey.RUN_NUM, job, private=False, sticky=True)
    ctx.set_prop(ReservedKey.ENGINE, _Engine(str(root)), private=True, sticky=True)
    ctx.set_prop(FLContextKey.SIMULATE_MODE, True, private=True, sticky=True)
    return ctx


def _task(weights, round_):
    s = DXO(data_kind=DataKind.WEIGHTS, data=weights).to_shareable()
    s.set_header(AppConstants.CURRENT_ROUND, round_)
    return s


def _executor(tmp_path):
    return SegmentationExecutor(task="skin2d", num_train=6, num_val=2, image_size=32, local_epochs=1, batch_size=3,
                         device="cpu", hd95=False, data_root=str(tmp_path / "data"))


def test_a_new_executor_process_continues_the_previous_rounds_state(tmp_path):
    ws = tmp_path / "site-1"
    ws.mkdir()
    first = _executor(tmp_path)
    g0 = {k: v.numpy().copy() for k, v in TaskNetwork("skin2d").state_dict().items()}
    ctx = _ctx(ws)
    out = first.execute(AppConstants.TASK_TRAIN, _task(g0, 0), ctx, Signal())
    assert out.get_return_code() in (None, "OK")
    saved = torch.load(ws / "adpfl_state" / "site-1.session.pt", weights_only=True)
    assert saved["job_id"] == "job-1" and saved["round"] == 0

    g1 = {k: v + 0.01 for k, v in g0.items()}
    second = _executor(tmp_path)  # the simulator's next process for this site
    ctx = _ctx(ws)
    out = second.execute(AppConstants.TASK_TRAIN, _task(g1, 1), ctx, Signal())
    assert out.get_return_code() in (None, "OK")
    assert ctx.get_prop(PUBLIC_INFO_PROP)["global_change"] > 0  # the filter's progress signal continued
    s1, s2 = first._session.trainer.optimizer_for(first._session.model), second._session.trainer
    # the second process started from the first one's Adam moments (one more step on top)
    step1 = next(iter(s1.state_dict()["state"].values()))["step"]
    step2 = next(iter(s2.optimizer_for(second._session.model).state_dict()["state"].values()))["step"]
    assert float(step2) == float(step1) + 2

    # another job, or a round that does not follow the saved one, starts fresh
    third = _executor(tmp_path)
    ctx = _ctx(ws, job="job-2")
    third.execute(AppConstants.TASK_TRAIN, _task(g1, 1), ctx, Signal())
    assert ctx.get_prop(PUBLIC_INFO_PROP)["global_change"] is None
    np.testing.assert_equal(float(next(iter(third._session.trainer.optimizer_for(
        third._session.model).state_dict()["state"].values()))["step"]), 2.0)


def test_a_seeded_run_repeats_its_non_private_randomness(tmp_path):
    """The job's ``seed`` fixes the initial global model and each site's shuffling and
    augmentation (sites differ from each other); unseeded runs stay fresh."""
    a, b = TaskNetwork("skin2d", init_seed=7), TaskNetwork("skin2d", init_seed=7)
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(v, w, msg=k)
    before = torch.get_rng_state()
    TaskNetwork("skin2d", init_seed=8)
    assert torch.equal(before, torch.get_rng_state())  # the global RNG is left alone

    calls = []

    def diff(site, seed):
        cfg = SiteConfig(task="skin2d", num_train=6, num_val=2, hd95=False)
        s = SiteSession(site, cfg, TrainConfig(**dict(TINY, seed=seed)))
        s.setup(str(tmp_path / "data"))
        g = {k: v.numpy().copy() for k, v in a.state_dict().items()}
        s.load_global(g)
        torch.manual_seed(len(calls))  # whatever the process drew before: not part of a seeded run
        calls.append(site)
        return s.train_round(g, 0).diff

    first, again = diff("site-1", 3), diff("site-1", 3)
    other_site = diff("site-2", 3)
    for k in first:
        np.testing.assert_array_equal(first[k], again[k])
    assert any(not np.array_equal(first[k], other_site[k]) for k in first)
    with pytest.raises(ValueError, match="seed"):
        TrainConfig(seed=-1).validate()
