"""Real simulator runs of the job definitions on tiny synthetic skin data (the ADP-FL run goes
through the README main command's route, `adpfl run` on FLARE's SimEnv; the others run
exported job folders with `nvflare simulator`, as the checked-in folders are run)."""

import pytest
import torch

from flare_helpers import TINY_EXECUTOR, inject_faults, load_json, logs, read_scalars, run_dir, run_simulator, tiny_job

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


@pytest.fixture(scope="module")
def adpfl_run(tmp_path_factory):
    """One tiny skin2d ADP-FL run through the README main command's route (`adpfl run`:
    FLARE's SimEnv in a child process, one line per round); shared by the tests below."""
    import json
    import os
    import subprocess
    import sys

    tmp = tmp_path_factory.mktemp("adpfl_run")
    overrides = tmp / "tiny.json"
    overrides.write_text(json.dumps({"executor": TINY_EXECUTOR}))
    ws = tmp / "ws"
    env = dict(os.environ, ADPFL_DATA_ROOT=str(tmp / "data"), OMP_NUM_THREADS="1")
    cli = [os.path.join(os.path.dirname(sys.executable), "adpfl"), "run", "--task", "skin2d", "--mode", "adpfl",
           "--rounds", "2", "--overrides", str(overrides), "-w", str(ws), "--clean"]
    proc = subprocess.run(cli, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {"ws": ws, "sim_ws": ws / "skin2d_adpfl", "stdout": proc.stdout, "stderr": proc.stderr,
            "data": tmp / "data"}


def test_adpfl_run_writes_privacy_report_and_curves(adpfl_run):
    ws = adpfl_run["ws"]
    rd = run_dir(ws)
    assert rd.parent.parent == adpfl_run["sim_ws"]  # SimEnv's <workspace root>/<job name> layout
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
        site_ledger = load_json(adpfl_run["sim_ws"] / "local" / "adpfl_privacy" / site / "skin2d.json")
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


def test_main_command_prints_a_line_per_round_and_keeps_flares_log(adpfl_run):
    out, ws = adpfl_run["stdout"], adpfl_run["ws"]
    lines = out.splitlines()
    assert len(lines) <= 30, out
    assert "deprecated" not in out + adpfl_run["stderr"]
    assert f"FLARE's full log: {ws / 'flare_log.txt'}" in lines[0]
    rounds = [ln for ln in lines if ln.startswith("round ")]
    assert [ln.split()[1] for ln in rounds] == ["1/2", "2/2"], out
    report = load_json(run_dir(ws) / "privacy_report.json")
    for ln, r in zip(rounds, (0, 1)):
        assert "Dice 0." in ln and "elapsed, ETA" in ln
        for site, info in report["sites"].items():
            eps = next(e["epsilon_rdp"] for e in info["ledger"] if e["round"] == r)
            assert f"{site} {eps:.4g}" in ln, (ln, site, eps)
    assert "site-level update DP (replace-one), delta=1e-05, RDP" in out
    flare_log = (ws / "flare_log.txt").read_text(errors="replace")
    assert "Round 1 started" in flare_log and "deprecated" not in flare_log
    # warnings the bundle itself caused are gone (FLARE's aggregator, the final selection)
    text = flare_log + logs(ws)
    assert "Aggregation_weight missing" not in text and "cannot change to private" not in text
    png = run_dir(ws) / "rounds.png"
    assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG" and f"curves:       {png}" in out
    progress = load_json(run_dir(ws) / "run_progress.json")
    assert [h["round"] for h in progress["history"]] == [0, 1]
    assert set(progress["history"][1]["dice"]) == {"site-1", "site-2", "site-3"}


def test_exported_bundle_loads_with_monai_and_carries_the_runs_privacy_card(adpfl_run, tmp_path):
    from monai.bundle import ConfigParser

    from adpfl.cli import main
    from adpfl.privacy.policy import UNCOVERED

    out = tmp_path / "bundle"
    assert main(["export", "--run", str(adpfl_run["ws"]), "--out", str(out)]) == 0
    parser = ConfigParser()
    parser.read_config(str(out / "configs" / "inference.json"))
    parser.read_meta(str(out / "configs" / "metadata.json"))
    parser["bundle_root"] = str(out)
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(torch.load(parser.get_parsed_content("checkpoint"), weights_only=True))
    net.eval()
    # one validation case of site-1, without its mask, through the bundle's own chain
    image = sorted((adpfl_run["data"] / "skin2d" / "site-1" / "images").glob("*.png"))[0]
    case = parser.get_parsed_content("preprocessing")({"image": str(image)})
    with torch.no_grad():
        pred = parser.get_parsed_content("inferer")(case["image"][None], net)
    labels = parser.get_parsed_content("postprocessing")({"pred": pred[0]})["pred"]
    assert tuple(labels.shape) == (1, 32, 32) and set(torch.unique(labels).tolist()) <= {0.0, 1.0}
    # the card is the run's privacy report, not a restatement of it
    card = load_json(out / "configs" / "metadata.json")["privacy_card"]
    report = load_json(run_dir(adpfl_run["ws"]) / "privacy_report.json")
    assert card["units"] == [{"level": "update", "unit": report["unit"]}]
    assert card["delta"] == {"update_level": report["delta"]}
    assert card["accountants"]["update_level"] == report["accountants"]
    assert {s: e["epsilon_rdp"] for s, e in card["epsilon_per_site"]["update_level"].items()} == {
        s: i["epsilon_rdp"] for s, i in report["sites"].items()}
    assert card["not_covered"] == report["not_covered"] == UNCOVERED
    assert card["rounds"]["completed"] == card["rounds"]["planned"] == 2
    assert card["sites"] == ["site-1", "site-2", "site-3"]
    assert card["mechanism"]["job_settings"]["keep_fraction"] == 0.5
    assert card["data"]["image_size"] == [32, 32] and card["data"]["cases_per_site"]["train"] == 6


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

