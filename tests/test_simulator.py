"""Real `nvflare simulator` runs of the job definitions on tiny synthetic skin data."""

import pytest
import torch

from flare_helpers import inject_faults, load_json, logs, read_scalars, run_dir, run_simulator, tiny_job

pytestmark = pytest.mark.integration


def test_npfl_run_trains_records_metrics_and_rejects_malformed_contributions(tmp_path):
    job = tiny_job(tmp_path, "skin2d", "npfl", num_rounds=2)
    ws = tmp_path / "ws"
    # round 0: site-1 sends NaN, site-2 full weights instead of a difference, site-3 a valid
    # update (wrong keys/shapes are covered by test_reliability's check_update tests, through
    # the same server path); round 1: all three are valid
    inject_faults(job, "site-1:nan_update:0,site-2:weights_kind:0")
    proc = run_simulator(job, ws, tmp_path / "data")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = logs(ws)
    assert "rejected the contribution of site-1 in round 0: entry" in text and "NaN or Inf" in text
    assert "rejected the contribution of site-2 in round 0: data kind WEIGHTS" in text
    assert "rejected the contribution of site-3" not in text and "in round 1:" not in text
    assert "Contribution from site-3 ACCEPTED by the aggregator at round 0" in text
    assert "Contribution from site-1 ACCEPTED by the aggregator at round 1" in text
    rd = run_dir(ws)
    model = torch.load(rd / "app_server" / "FL_global_model.pt", weights_only=False)
    assert "model" in model and len(model["model"]) > 0
    scalars = read_scalars(rd / "tb_events")
    for site in ("site-1", "site-2", "site-3"):
        assert any(f"{site}" in str(p) for p in (rd / "tb_events").iterdir())
    dice_tags = [t for t in scalars if t.startswith("val_global/dice")]
    assert dice_tags, sorted(scalars)
    # metrics of rounds 0 and 1 recorded, and the global model changed between them
    by_step = {}
    for step, value in scalars["val_global/dice_lesion"]:
        by_step.setdefault(step, []).append(value)
    assert sorted(by_step) == [0, 1]
    assert by_step[0] != by_step[1]
    assert len(by_step[0]) == 3  # one value per site
    final = load_json(rd / "cross_site_val" / "cross_val_results.json")
    assert set(final) == {"site-1", "site-2", "site-3"}
    assert "dice_mean" in final["site-1"]["SRV_FL_global_model.pt"]
    # "best" means best: the final model was scored and competed, so the best model scores at
    # least as well as the final one on the sites' validation sets (the selection's own metric)
    assert "final global model: dice_mean" in text
    best_mean = sum(final[s]["SRV_best_FL_global_model.pt"]["dice_mean"] for s in final) / 3
    final_mean = sum(final[s]["SRV_FL_global_model.pt"]["dice_mean"] for s in final) / 3
    assert best_mean >= final_mean - 1e-6, (best_mean, final_mean)


def test_adpfl_run_writes_privacy_report_and_curves(tmp_path):
    job = tiny_job(tmp_path, "skin2d", "adpfl", num_rounds=2)
    ws = tmp_path / "ws"
    proc = run_simulator(job, ws, tmp_path / "data")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rd = run_dir(ws)
    report = load_json(rd / "privacy_report.json")
    assert report["delta"] > 0 and "site-level" in report["unit"]
    assert set(report["sites"]) == {"site-1", "site-2", "site-3"}
    for site, info in report["sites"].items():
        assert info["releases"] == 2
        entries = info["ledger"]
        assert [e["round"] for e in entries] == [0, 1]
        for e in entries:
            for key in ("noise_multiplier", "clip_norm", "keep_fraction", "epsilon_rdp", "mask_covered"):
                assert key in e
        assert entries[1]["epsilon_rdp"] > entries[0]["epsilon_rdp"] > 0
        assert info["epsilon_rdp"] <= report["target_epsilon"]
        # the site's own ledger lives in its workspace and agrees with the server's figure
        site_ledger = load_json(ws / "local" / "adpfl_privacy" / site / "skin2d.json")
        assert len(site_ledger["entries"]) == 2
        assert site_ledger["entries"][-1]["epsilon_rdp"] == pytest.approx(info["epsilon_rdp"], rel=1e-6)
    assert report["stopped_early"] is False
    assert report["rejected_contributions"] == []
    scalars = read_scalars(rd / "tb_events")
    assert "privacy/site-1/epsilon_rdp" in scalars, sorted(scalars)
    assert "privacy/site-2/noise_multiplier" in scalars
    # keep_fraction 0.5: only kept coordinates travelled, and the server densified them
    text = logs(ws)
    assert text.count("densified") >= 6, text[-3000:]  # 3 sites x 2 rounds
    assert "rejected the sparse contribution" not in text
    model = torch.load(rd / "app_server" / "FL_global_model.pt", weights_only=False)["model"]
    assert all(torch.isfinite(torch.as_tensor(v)).all() for v in model.values())
    # the comparison harness reads this run as it reads its own
    from adpfl.experiments.compare import collect_run
    from adpfl.experiments.report import epsilon_spent

    run = collect_run(ws, {"mode": "adpfl"})
    assert set(run["final"]) == {"site-1", "site-2", "site-3"} and run["regions"] == ["lesion"]
    assert [e["round"] for e in run["privacy"]["sites"]["site-1"]["per_round"]] == [0, 1]
    assert epsilon_spent(run) == pytest.approx(max(i["epsilon_rdp"] for i in report["sites"].values()))


@pytest.mark.parametrize("task", ["kidney3d", "brain3d"])
def test_3d_adpfl_job_runs_one_round(tmp_path, task):
    job = tiny_job(
        tmp_path, task, "adpfl", num_rounds=1, min_clients=2,
        executor={"num_train": 2, "num_val": 1, "image_size": 32, "batch_size": 1, "hd95": False},
    )
    ws = tmp_path / "ws"
    proc = run_simulator(job, ws, tmp_path / "data", n_sites=2)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    final = load_json(run_dir(ws) / "cross_site_val" / "cross_val_results.json")
    assert set(final) == {"site-1", "site-2"}
    regions = {"kidney3d": "dice_kidney_tumor_cyst", "brain3d": "dice_WT"}[task]
    assert regions in final["site-1"]["SRV_FL_global_model.pt"]
    # the challenge's own metrics travel with the final evaluation; every value is a number
    challenge = {"kidney3d": ["sdice_tumor"], "brain3d": ["dice_RC", "lesion_dice_ET", "lesion_dice_RC"]}[task]
    for site in final.values():
        m = site["SRV_FL_global_model.pt"]
        assert set(challenge) <= set(m) and all(isinstance(v, float) for v in m.values()), m
    report = load_json(run_dir(ws) / "privacy_report.json")
    assert {s: i["releases"] for s, i in report["sites"].items()} == {"site-1": 1, "site-2": 1}


def test_budget_smaller_than_plan_stops_early(tmp_path):
    # fixed z=1 costs about epsilon 4.8 for the first round and 7.1 after two (RDP, delta 1e-5):
    # a budget of 6 allows one round of the three planned
    job = tiny_job(
        tmp_path, "skin2d", "dpfl", num_rounds=3, min_clients=2,
        privacy={"noise_multiplier": 1.0, "target_epsilon": 6.0, "clip_norm": 1.0},
    )
    ws = tmp_path / "ws"
    proc = run_simulator(job, ws, tmp_path / "data", n_sites=2)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = load_json(run_dir(ws) / "privacy_report.json")
    assert report["stopped_early"] is True
    assert "exceeds target_epsilon=6.0" in report["stop_reason"]
    for info in report["sites"].values():
        assert info["releases"] == 1
        assert info["epsilon_rdp"] <= 6.0
    assert "next round exceeds target_epsilon" in logs(ws)
    # the final model of the completed round was persisted
    assert (run_dir(ws) / "app_server" / "FL_global_model.pt").is_file()

