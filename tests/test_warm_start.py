"""Warm start from a checkpoint trained only on declared public data (setting `initial_checkpoint`).

A tiny `pretrain_public` run (2 public sites x 4 images, 16x16, 1 epoch) writes a checkpoint;
the job's initial model (the server persistor's TaskNetwork, as exported) and the in-process
runner's first global model are its weights, and every checkpoint that is not a declared-public
one for the job's task and network is refused with an error naming the setting and the file.
"""

import json
import shutil

import numpy as np
import pytest
import torch

from adpfl.tasks.checkpoint import (
    CheckpointError,
    provenance_path,
    read_provenance,
    save_public_checkpoint,
    sha256_file,
)
from adpfl.tasks.network import TaskNetwork


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from adpfl.training.pretrain import pretrain_public

    root = tmp_path_factory.mktemp("warm")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pretrain_public("skin2d", str(root / "ck.pt"), network="standard", data_root=str(root / "data"),
                        num_train=4, num_val=2, image_size=16, epochs=1, batch_size=4, public_sites=2,
                        command="test", log=lambda line: None)
    finally:
        torch.set_num_threads(threads)
    return root / "ck.pt"


def _copy(ckpt, tmp_path):
    dst = tmp_path / "c.pt"
    shutil.copy(ckpt, dst)
    shutil.copy(provenance_path(ckpt), provenance_path(dst))
    return dst


def test_provenance_declares_public_non_federation_data(ckpt):
    prov = read_provenance(ckpt)
    assert prov["public"] is True and prov["task"] == "skin2d" and prov["network"] == "standard"
    assert prov["sha256"] == sha256_file(ckpt) and prov["image_size"] == [16, 16] and prov["command"] == "test"
    data = prov["data"]
    assert data["sites"] == ["public-1", "public-2"] and data["data_seed"] == 1000
    # no federation site's index (site-N -> N - 1) nor its drawn acquisition shift
    assert min(data["site_indices"]) >= 1000 and data["num_train"] == 8
    assert len(prov["public_validation_dice_by_epoch"]) == 1


def test_task_network_loads_the_checkpoint(ckpt):
    saved = torch.load(ckpt, weights_only=True)
    net = TaskNetwork("skin2d", "standard", initial_checkpoint=str(ckpt))
    for k, v in net.state_dict().items():
        assert torch.equal(v, saved[k]), k
    fresh = TaskNetwork("skin2d", "standard", init_seed=0)
    assert not all(torch.equal(v, saved[k]) for k, v in fresh.state_dict().items())


def test_refuses_missing_file_and_missing_provenance(ckpt, tmp_path):
    with pytest.raises(CheckpointError, match=r"initial_checkpoint=.*nope\.pt: no such file"):
        TaskNetwork("skin2d", initial_checkpoint=str(tmp_path / "nope.pt"))
    c = _copy(ckpt, tmp_path)
    provenance_path(c).unlink()
    with pytest.raises(CheckpointError, match=r"initial_checkpoint=.*c\.pt: its provenance .* is missing"):
        TaskNetwork("skin2d", initial_checkpoint=str(c))
    provenance_path(c).write_text("{not json")
    with pytest.raises(CheckpointError, match="not readable JSON"):
        TaskNetwork("skin2d", initial_checkpoint=str(c))


def test_refuses_provenance_not_declaring_public_data(ckpt, tmp_path):
    c = _copy(ckpt, tmp_path)
    for public in (False, "true", None):
        prov = json.loads(provenance_path(c).read_text())
        prov["public"] = public
        provenance_path(c).write_text(json.dumps(prov))
        with pytest.raises(CheckpointError, match="does not declare public training data"):
            TaskNetwork("skin2d", initial_checkpoint=str(c))


def test_refuses_weights_changed_after_writing(ckpt, tmp_path):
    c = _copy(ckpt, tmp_path)
    state = torch.load(c, weights_only=True)
    first = next(iter(state))
    state[first] = state[first] + 1.0
    torch.save(state, c)
    with pytest.raises(CheckpointError, match="sha256 .* is not the one its provenance"):
        TaskNetwork("skin2d", initial_checkpoint=str(c))


def test_refuses_other_task_network_or_shapes(ckpt, tmp_path):
    with pytest.raises(CheckpointError, match="trained for network 'standard', the job's network is 'dp'"):
        TaskNetwork("skin2d", "dp", initial_checkpoint=str(ckpt))
    with pytest.raises(CheckpointError, match="trained for task 'skin2d', the job's task is 'kidney3d'"):
        TaskNetwork("kidney3d", initial_checkpoint=str(ckpt))
    # a declared-public file whose tensors do not fit: one weight of the wrong shape, one key missing
    state = torch.load(ckpt, weights_only=True)
    key = next(k for k, v in state.items() if v.dim() == 4)
    bad = dict(state, **{key: state[key][:1]})
    save_public_checkpoint(bad, tmp_path / "shape.pt", {"task": "skin2d", "network": "standard"})
    with pytest.raises(CheckpointError, match=rf"weight {key} has shape"):
        TaskNetwork("skin2d", initial_checkpoint=str(tmp_path / "shape.pt"))
    save_public_checkpoint({k: v for k, v in state.items() if k != key}, tmp_path / "keys.pt",
                           {"task": "skin2d", "network": "standard"})
    with pytest.raises(CheckpointError, match="do not fit the skin2d standard network: missing"):
        TaskNetwork("skin2d", initial_checkpoint=str(tmp_path / "keys.pt"))


def test_jobs_initial_model_is_the_checkpoint(ckpt, tmp_path):
    """The exported job's persistor builds its model from the config, as the FLARE server does."""
    from nvflare.fuel.utils.class_utils import instantiate_class

    from adpfl.flare.jobs import build_job, export_job

    path = export_job("skin2d", "npfl", str(tmp_path / "jobs"), executor={"initial_checkpoint": str(ckpt)})
    server = json.loads(next((tmp_path / "jobs").rglob("config_fed_server.json")).read_text())
    persistor = next(c for c in server["components"] if c["id"] == "persistor")
    model = persistor["args"]["model"]
    assert model["args"]["initial_checkpoint"] == str(ckpt.resolve()), path
    built = instantiate_class(model["path"], model["args"])
    saved = torch.load(ckpt, weights_only=True)
    assert all(torch.equal(v, saved[k]) for k, v in built.state_dict().items())
    # a checkpoint that is not declared public stops the job being built at all
    c = _copy(ckpt, tmp_path)
    provenance_path(c).write_text(json.dumps(dict(read_provenance(c), public=False)))
    with pytest.raises(CheckpointError, match="does not declare public training data"):
        build_job("skin2d", "npfl", executor={"initial_checkpoint": str(c)})


def test_inprocess_runner_starts_from_the_checkpoint(ckpt, tmp_path, monkeypatch):
    from adpfl.experiments.compare import run_overrides
    from adpfl.experiments.inprocess import run_inprocess
    from adpfl.training.site import SiteSession

    seen = []
    original = SiteSession.load_global

    def spy(self, weights, *a, **kw):
        seen.append({k: np.array(v, copy=True) for k, v in weights.items()})
        return original(self, weights, *a, **kw)

    monkeypatch.setattr(SiteSession, "load_global", spy)
    spec = {"mode": "npfl", "seed": 0, "epsilon": None, "run_id": "npfl_seed0"}
    ov = run_overrides(spec, 1, {"num_train": 2, "num_val": 1, "image_size": 16, "batch_size": 2,
                                 "local_epochs": 1, "max_steps_per_round": 1, "hd95": False,
                                 "initial_checkpoint": str(ckpt)}, 1e-5)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = run_inprocess(spec, "skin2d", 1, 1, ov, tmp_path / "data", tmp_path / "run")
    finally:
        torch.set_num_threads(threads)
    saved = torch.load(ckpt, weights_only=True)
    assert res["settings"]["executor"]["initial_checkpoint"] == str(ckpt)
    assert set(seen[0]) == set(saved)
    assert all(np.array_equal(seen[0][k], saved[k].numpy()) for k in saved)


def test_keep_best_writes_the_best_public_epoch(tmp_path, monkeypatch):
    """keep="best": the weights written are those of the epoch with the highest public validation
    Dice (here the first of two, by a scripted evaluation), and the provenance says which."""
    from adpfl.training import pretrain as pre

    states, scripted = [], iter([0.5, 0.2])

    def evaluate(self, model, with_hd95=False):
        states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return {"dice_mean": next(scripted)}

    monkeypatch.setattr(pre.LocalTrainer, "evaluate", evaluate)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        prov = pre.pretrain_public("skin2d", str(tmp_path / "best.pt"), data_root=str(tmp_path / "data"),
                                   num_train=4, num_val=2, image_size=16, epochs=2, batch_size=2, public_sites=1,
                                   keep="best", log=lambda line: None)
    finally:
        torch.set_num_threads(threads)
    assert prov["kept_epoch"] == 1 and prov["keep"] == "best" and prov["public_validation_dice_by_epoch"] == [0.5, 0.2]
    saved = torch.load(tmp_path / "best.pt", weights_only=True)
    assert all(torch.equal(saved[k], v) for k, v in states[0].items())
    assert not all(torch.equal(saved[k], v) for k, v in states[1].items())
    with pytest.raises(ValueError, match="keep"):
        pre.pretrain_public("skin2d", str(tmp_path / "x.pt"), keep="first")
