"""`adpfl compare` / `adpfl report`: report functions on synthetic run.json data (fast) and the
harness end to end on a tiny configuration with resume (integration)."""

import csv
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from adpfl._io import read_json
from adpfl.experiments.compare import parse_kv, plan_runs, run_overrides
from adpfl.experiments.report import (
    dice_curve,
    epsilon_spent,
    load_runs,
    round_stability,
    rounds_to_reach,
    summarize,
    write_report,
)
from adpfl.modes import UPDATE_MODES

ROUNDS = 4


def _fake_run(mode, seed, eps, final_dice, curve, eps_spent=None):
    """A run.json shaped like compare.collect_run's, two sites, two regions."""
    sites = ("site-1", "site-2")
    run = {
        "run_id": f"{mode}_{eps}_{seed}", "task": "kidney3d", "mode": mode, "epsilon": eps, "seed": seed,
        "rounds": ROUNDS, "sites": 2, "delta": 1e-5, "wall_time_s": 10.0 + seed,
        "regions": ["kidney", "tumor"],
        "curves": {s: {"dice_mean": {str(r): v for r, v in enumerate(curve)},
                       "dice_kidney": {str(r): v for r, v in enumerate(curve)}} for s in sites},
        "final": {s: {"dice_kidney": final_dice + 0.05, "dice_tumor": final_dice - 0.05, "dice_mean": final_dice,
                      "hd95_kidney": 5.0, "hd95_tumor": float("nan") if s == "site-2" else 9.0} for s in sites},
        "privacy": None,
    }
    if mode != "npfl":
        run["privacy"] = {"delta": 1e-5, "target_epsilon": eps, "sites": {
            s: {"releases": ROUNDS, "epsilon_rdp": eps_spent * (1 + i * 0.1), "epsilon_prv": eps_spent * 0.9,
                "per_round": [{"round": r, "epsilon_rdp": eps_spent * (r + 1) / ROUNDS, "epsilon_prv": None}
                              for r in range(ROUNDS)]}
            for i, s in enumerate(sites)}}
    return run


def _write(out: Path, runs):
    for run in runs:
        d = out / "runs" / run["run_id"]
        d.mkdir(parents=True)
        (d / "run.json").write_text(json.dumps(run))


@pytest.fixture
def synthetic(tmp_path):
    runs = []
    for seed in (0, 1):
        runs.append(_fake_run("npfl", seed, None, 0.80, [0.1, 0.5, 0.7, 0.78]))
        # eps 1e4: DP-FL at 50 % of NP-FL, never reaches 90 %; ADP-FL at 92.5 %
        runs.append(_fake_run("dpfl", seed, 1e4, 0.40, [0.1, 0.2, 0.3, 0.35], eps_spent=9e3))
        runs.append(_fake_run("adpfl", seed, 1e4, 0.74, [0.1, 0.4, 0.6, 0.73], eps_spent=8e3))
        # eps 1e5: both fine; DP-FL reaches 0.73 (> 90 %) at round 2
        runs.append(_fake_run("dpfl", seed, 1e5, 0.78 + 0.02 * seed, [0.1, 0.5, 0.73, 0.75], eps_spent=9e4))
        runs.append(_fake_run("adpfl", seed, 1e5, 0.79, [0.1, 0.5, 0.7, 0.79], eps_spent=9e4))
    _write(tmp_path, runs)
    return tmp_path


def test_run_helpers():
    run = _fake_run("npfl", 0, None, 0.8, [0.1, 0.5, 0.7, 0.78])
    assert dice_curve(run) == {0: 0.1, 1: 0.5, 2: 0.7, 3: 0.78, ROUNDS: 0.8}
    assert rounds_to_reach(dice_curve(run), 0.72) == 3
    assert rounds_to_reach(dice_curve(run), 0.95) is None
    assert math.isnan(epsilon_spent(run))
    assert epsilon_spent(_fake_run("dpfl", 0, 1e4, 0.4, [0.1], eps_spent=100.0)) == pytest.approx(110.0)


def test_round_stability_ignores_the_first_learning_step_and_finds_the_largest_drop():
    # round 0 -> 1 (0.1 -> 0.5) is learning; after it: +0.2, -0.1, +0.12
    change, drop = round_stability({0: 0.1, 1: 0.5, 2: 0.7, 3: 0.6, 4: 0.72})
    assert change == pytest.approx((0.2 + 0.1 + 0.12) / 3) and drop == pytest.approx(0.1)
    assert round_stability({0: 0.1, 1: 0.5, 2: 0.6})[1] == 0.0  # monotone: no drop
    assert all(math.isnan(v) for v in round_stability({0: 0.1, 1: 0.5}))


def test_summarize_table_and_statements(synthetic):
    s = summarize(load_runs(synthetic))
    assert s["regions"] == ["kidney", "tumor"]
    rows = {r["method"]: r for r in s["rows"]}
    assert list(rows) == ["NP-FL", "DP-FL eps=10000", "DP-FL eps=100000", "ADP-FL eps=10000", "ADP-FL eps=100000"]
    assert rows["NP-FL"]["dice_mean"] == (pytest.approx(0.8), pytest.approx(0.0))
    assert rows["NP-FL"]["dice_kidney"][0] == pytest.approx(0.85)
    assert rows["NP-FL"]["hd95_tumor"][0] == pytest.approx(9.0)  # NaN sites skipped
    assert rows["NP-FL"]["epsilon_rdp"] is None
    m, sd = rows["DP-FL eps=100000"]["dice_mean"]
    assert m == pytest.approx(0.79) and sd == pytest.approx(0.02 / math.sqrt(2))
    assert rows["DP-FL eps=10000"]["rounds_to_90"] == [None, None]
    assert rows["DP-FL eps=100000"]["rounds_to_90"] == [2, 2]
    assert rows["ADP-FL eps=10000"]["rounds_to_90"] == [3, 3]  # 0.73 >= 0.72 at round 3
    assert rows["NP-FL"]["rounds_to_90"] == [3, 3]
    assert rows["DP-FL eps=10000"]["epsilon_rdp"][0] == pytest.approx(9900.0)  # max over sites
    assert rows["DP-FL eps=10000"]["epsilon_prv"][0] == pytest.approx(8100.0)
    assert rows["ADP-FL eps=10000"]["dice_fraction_of_npfl"] == pytest.approx(0.925)
    # 0.5, 0.7, 0.78, final 0.80 after round 1: changes 0.2, 0.08, 0.02, no drop
    assert rows["NP-FL"]["round_abs_change"][0] == pytest.approx(0.1) and rows["NP-FL"]["round_max_drop"][0] == 0
    st = " ".join(s["statements"])
    assert "epsilon=10000, DP-FL keeps 50.0%" in st and "ADP-FL keeps 92.5%" in st
    assert "epsilon=100000" not in st


def test_write_report_files(synthetic):
    paths = write_report(synthetic)
    md = Path(paths["markdown"]).read_text()
    assert "| NP-FL |" in md and "not reached" in md and "ADP-FL keeps 92.5%" in md
    # every private run's spend at every site, with its unit and delta (DP-FL eps 1e4, seed 0: 9000 / 9900)
    assert "| dpfl_10000.0_0 | site-1 | one site's update | 1e-05 | 9000.0000 | 8100.0000 |" in md
    assert "| dpfl_10000.0_0 | site-2 | one site's update | 1e-05 | 9900.0000 |" in md
    assert "npfl_None_0 |" not in md.split("## Epsilon spent per site")[1]
    with open(paths["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 5 and "dice_tumor_mean" in rows[0] and "epsilon_rdp_max_site_mean" in rows[0]
    assert float(rows[0]["round_abs_change_mean"]) == pytest.approx(0.1) and rows[0]["round_max_drop_mean"] == "0.0"
    assert "Round-to-round abs. change / largest drop" in md
    assert {Path(p).name for p in paths["plots"]} == {"convergence.png", "frontier.png", "epsilon_by_round.png"}
    for p in paths["plots"]:
        assert Path(p).stat().st_size > 1000 and Path(p).read_bytes()[:4] == b"\x89PNG"


def test_report_names_the_scoring_and_prints_no_cases(tmp_path):
    """The report's header defines every metric (which HD95 included); a figure no site had
    reads "no cases", never 0; the task's challenge metric gets its own columns."""
    runs = [_fake_run("npfl", 0, None, 0.8, [0.5, 0.8])]
    for site in runs[0]["final"].values():
        site.update(hd95_tumor=None, sdice_kidney=0.7, sdice_tumor=None)
    _write(tmp_path, runs)
    md = Path(write_report(tmp_path)["markdown"]).read_text()
    assert "## Scoring" in md and "KiTS23" in md and "larger of the two directed 95th" in md
    header = next(line for line in md.splitlines() if line.startswith("| Method"))
    assert "Surface Dice kidney" in header and "HD95 tumor" in header
    row = next(line for line in md.splitlines() if line.startswith("| NP-FL"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    cols = [c.strip() for c in header.strip("|").split("|")]
    assert cells[cols.index("HD95 tumor")] == "no cases" and cells[cols.index("Surface Dice tumor")] == "no cases"
    assert cells[cols.index("Surface Dice kidney")].startswith("0.700")


def test_report_says_prv_not_computed(tmp_path):
    """A private run whose PRV epsilon was not computed (update-level z < 0.1) reads "not
    computed" in the PRV column, not "no cases" (which is for metrics no case had)."""
    runs = [_fake_run("npfl", 0, None, 0.8, [0.5, 0.8]), _fake_run("dpfl", 0, 1e5, 0.7, [0.4, 0.7], eps_spent=1e5)]
    for site in runs[1]["privacy"]["sites"].values():
        site["epsilon_prv"] = None
    _write(tmp_path, runs)
    md = Path(write_report(tmp_path)["markdown"]).read_text()
    header = next(line for line in md.splitlines() if line.startswith("| Method"))
    row = next(line for line in md.splitlines() if line.startswith("| DP-FL"))
    cols = [c.strip() for c in header.strip("|").split("|")]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[cols.index("eps PRV (max site)")] == "not computed"
    assert cells[cols.index("eps RDP (max site)")].startswith("110000.0")


def test_report_cli(synthetic):
    from adpfl.cli import main

    assert main(["report", "--out", str(synthetic)]) == 0
    assert (synthetic / "report.md").is_file()


def test_plan_and_overrides():
    plan = plan_runs([0, 1], [1e4, 1e5])
    assert len(plan) == 2 * (1 + 2 * 2)
    with_dpsgd = plan_runs([0], [1e5], [8.0])
    assert [p["run_id"] for p in with_dpsgd][-2:] == ["dpsgd_eps8_seed0", "adpsgd_eps8_seed0"]
    assert run_overrides(with_dpsgd[-1], 2, {}, 1e-5)["executor"]["dpsgd_target_epsilon"] == 8.0
    ov = run_overrides(with_dpsgd[-2], 2, {"num_train": 6}, 1e-5)
    assert ov["executor"] == {"num_train": 6, "data_seed": 0, "dpsgd_target_epsilon": 8.0, "dpsgd_delta": 1e-5}
    assert "privacy" not in ov  # DP-SGD runs have no update-level filter
    assert [p["mode"] for p in plan_runs([0], [1e5], [8.0], modes=("npfl", "dpsgd"))] == ["npfl", "dpsgd"]
    with pytest.raises(ValueError, match="unknown"):
        plan_runs([0], [1e5], modes=("fedavg",))
    assert [p["run_id"] for p in plan[:3]] == ["npfl_seed0", "dpfl_eps10000_seed0", "adpfl_eps10000_seed0"]
    ov = run_overrides(plan[1], 3, {"num_train": 6}, 1e-5)
    assert ov == {"num_rounds": 3, "executor": {"num_train": 6, "data_seed": 0},
                  "privacy": {"target_epsilon": 1e4, "delta": 1e-5}}
    assert "privacy" not in run_overrides(plan[0], 3, {}, 1e-5)
    assert parse_kv(["amp=false", "learning_rate=0.01", "device=cpu"]) == {"amp": False, "learning_rate": 0.01,
                                                                        "device": "cpu"}


def test_record_executor_applies_to_record_level_runs_only():
    npfl, dpsgd, adpsgd = plan_runs([0], [], [2.0], modes=("npfl", "dpsgd", "adpsgd"))
    rec = {"batch_size": 256, "learning_rate": 0.01, "dpsgd_target_epsilon": 99.0}
    assert run_overrides(npfl, 2, {"batch_size": 8}, 1e-5, rec)["executor"] == {"batch_size": 8, "data_seed": 0}
    for spec in (dpsgd, adpsgd):
        ex = run_overrides(spec, 2, {"batch_size": 8, "num_train": 6}, 1e-5, rec)["executor"]
        # the record-level batch wins over the common one; the run's own budget wins over both
        assert ex == {"batch_size": 256, "num_train": 6, "learning_rate": 0.01, "data_seed": 0,
                      "dpsgd_target_epsilon": 2.0, "dpsgd_delta": 1e-5}


def test_resume_refuses_other_record_executor(tmp_path, monkeypatch):
    import argparse

    from adpfl.experiments import compare

    monkeypatch.setattr("adpfl.experiments.report.write_report", lambda out: {"markdown": "", "csv": "", "plots": []})
    args = argparse.Namespace(task="skin2d", epsilons=[], seeds=[0], dpsgd_epsilons=[], rounds=1, sites=1, delta=1e-5,
                              tiny=False, data_size=None, executor=[], record_executor=["batch_size=256"],
                              inprocess=True, modes=["dpsgd"], out=str(tmp_path))
    assert compare.cmd_compare(args) == 0  # no run planned (no record-level epsilon): settings recorded
    assert read_json(tmp_path / "compare.json")["record_executor"] == {"batch_size": 256}
    args.record_executor = ["batch_size=512"]
    with pytest.raises(ValueError, match="record_executor"):
        compare.cmd_compare(args)
    # a folder written before the key existed reads as no record-level overrides
    old = read_json(tmp_path / "compare.json")
    del old["record_executor"]
    (tmp_path / "compare.json").write_text(json.dumps(old))
    args.record_executor = []
    assert compare.cmd_compare(args) == 0


def test_inprocess_record_run_starts_from_the_jobs_network(tmp_path):
    """One tiny in-process DP-SGD round (no simulator) on the `dp` network variant (the grid's
    record-level setting): it is also the initial global model (the runner used to build the
    standard one, whose keys the sites rejected)."""
    from adpfl.experiments.inprocess import run_inprocess

    torch_threads = __import__("torch").get_num_threads()
    __import__("torch").set_num_threads(1)
    try:
        spec = {"mode": "dpsgd", "seed": 0, "epsilon": 8.0, "run_id": "dpsgd_eps8_seed0"}
        ov = run_overrides(spec, 1, {"num_train": 6, "num_val": 2, "image_size": 32, "batch_size": 3,
                                     "local_epochs": 1, "hd95": False}, 1e-5, {"learning_rate": 0.01, "network": "dp"})
        res = run_inprocess(spec, "skin2d", 1, 1, ov, tmp_path / "data", tmp_path / "run")
    finally:
        __import__("torch").set_num_threads(torch_threads)
    assert res["settings"]["executor"]["network"] == "dp" and res["settings"]["executor"]["learning_rate"] == 0.01
    site = res["privacy"]["sites"]["site-1"]
    assert res["privacy"]["unit"] == "record" and 0 < site["epsilon_rdp"] <= 8.0 and site["releases"] == 1
    assert 0.0 <= res["final"]["site-1"]["dice_mean"] <= 1.0 and "0" in res["curves"]["site-1"]["dice_mean"]


def test_inprocess_update_level_run_filters_enforces_and_recomputes(tmp_path):
    """Two tiny in-process ADP-FL rounds at 2 sites: every difference goes through the
    filter's pipeline (sparsify -> adaptive clip -> noise) with the site's own ledger on
    disk, the server recomputes each site's epsilon from the releases' metadata (site-level
    update DP), and a budget that affords one round makes the widget's rule stop the run."""
    import torch

    from adpfl.experiments.inprocess import run_inprocess
    from adpfl.privacy.ledger import PrivacyLedger

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    tiny = {"num_train": 4, "num_val": 2, "image_size": 32, "batch_size": 4, "local_epochs": 1, "hd95": False}
    try:
        spec = {"mode": "adpfl", "seed": 0, "epsilon": 1e5, "run_id": "adpfl_eps100000_seed0"}
        res = run_inprocess(spec, "skin2d", 2, 2, run_overrides(spec, 2, tiny, 1e-5), tmp_path / "data",
                            tmp_path / "run")
        # DP-FL at a budget of about one round's cost: the site's ledger refuses the second release
        one = {"mode": "dpfl", "seed": 0, "epsilon": 1e5, "run_id": "dpfl_once"}
        ov = run_overrides(one, 2, tiny, 1e-5)
        ov["privacy"] = {"target_epsilon": 6.0, "delta": 1e-5, "noise_multiplier": 1.0}
        res_once = run_inprocess(one, "skin2d", 2, 1, ov, tmp_path / "data", tmp_path / "run_once")
    finally:
        torch.set_num_threads(threads)
    priv = res["privacy"]
    assert priv["unit"] == "update" and priv["delta"] == 1e-5 and not priv["rejected_contributions"]
    for site in ("site-1", "site-2"):
        info = priv["sites"][site]
        assert info["releases"] == 2 and [e["round"] for e in info["per_round"]] == [0, 1]
        own = PrivacyLedger.load(str(tmp_path / "run" / "ledgers" / site / "skin2d.json"))
        assert len(own.entries) == 2  # the site's own ledger on disk
        assert info["epsilon_rdp"] == pytest.approx(own.epsilon("rdp"), rel=1e-9) == info["site_ledger_epsilon_rdp"]
        assert 0 < info["epsilon_rdp"] <= 1e5
        assert info["per_round"][0]["noise_multiplier"] != info["per_round"][1]["noise_multiplier"]  # adaptive
    assert 0.0 <= res["final"]["site-1"]["dice_mean"] <= 1.0
    once = res_once["privacy"]
    # z = 1: one release costs 4.73 at delta 1e-5 (RDP), a second 7.08 > 6: the widget stops the run
    assert once["sites"]["site-1"]["releases"] == 1
    assert [r["round"] for r in once["refused"]] == [1] or once["stopped_early"]


def test_paper_configuration_is_a_grid_variant_of_adpfl():
    """adpfl_paper runs the ADP-FL job with Laplace noise scaled to the adaptive percentile
    clip; its initial L1 clip comes from the job's L2 clip and the network's public size."""
    from adpfl.experiments.compare import variant_privacy
    from adpfl.modes import job_mode

    runs = plan_runs([0], [1e5], [], ["adpfl", "adpfl_paper"])
    assert [r["run_id"] for r in runs] == ["adpfl_eps100000_seed0", "adpfl_paper_eps100000_seed0"]
    assert job_mode("adpfl_paper") == "adpfl" and job_mode("dpfl") == "dpfl"
    ov = run_overrides(runs[1], 2, {}, 1e-5)
    extra = variant_privacy("adpfl_paper", "skin2d", ov)
    k = round(0.5 * 402181)  # the job's keep_fraction x the standard skin2d network's coordinates
    assert extra["noise_type"] == "laplace" and extra["clip_norm"] == pytest.approx(2.0 * math.sqrt(2 * k / math.pi),
                                                                                    abs=1e-3)
    assert variant_privacy("adpfl", "skin2d", ov) == {}


@pytest.mark.integration
def test_compare_tiny_end_to_end_and_resume(tmp_path):
    out = tmp_path / "cmp"
    adpfl = os.path.join(os.path.dirname(sys.executable), "adpfl")
    # DP-FL and ADP-FL run in the other simulator tests (test_simulator.py collects an ADP-FL
    # run with collect_run); here: NP-FL and the DP-SGD job
    cmd = [adpfl, "compare", "--task", "skin2d", "--epsilons", "1e5", "--dpsgd-epsilons", "8", "--seeds", "0",
           "--modes", "npfl", "dpsgd", "--rounds", "1", "--sites", "2", "--tiny", "--out", str(out),
           "--poll", "1", "--executor", "hd95=false"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[1/2] npfl_seed0" in proc.stdout and "[2/2] dpsgd_eps8_seed0" in proc.stdout
    runs = load_runs(out)
    assert sorted(r["run_id"] for r in runs) == ["dpsgd_eps8_seed0", "npfl_seed0"]
    for r in runs:
        assert set(r["final"]) == {"site-1", "site-2"}
        assert set(r["curves"]) == {"site-1", "site-2"} and "0" in r["curves"]["site-1"]["dice_mean"]
        assert r["settings"]["executor"]["data_seed"] == 0 and r["settings"]["num_rounds"] == 1
        if r["mode"] in UPDATE_MODES:
            assert r["settings"]["privacy"]["target_epsilon"] == 1e5 and r["settings"]["privacy"]["delta"] == 1e-5
            assert 0 < epsilon_spent(r) <= 1e5
        if r["mode"] == "dpsgd":
            assert r["settings"]["privacy"] is None and r["privacy"]["unit"] == "record"
            # one round of the one planned: the calibration spends (nearly) the whole record-level budget
            assert 7.9 <= epsilon_spent(r) <= 8.0
    for name in ("report.md", "summary.csv", "plots/convergence.png", "plots/frontier.png",
                 "plots/epsilon_by_round.png"):
        assert (out / name).is_file(), name
    _check_dpsgd_run(out / "runs" / "dpsgd_eps8_seed0" / "ws")
    md = (out / "report.md").read_text()
    assert "| DP-SGD (record-level) eps=8 |" in md and "record-level DP, one training image" in md
    stamps = {p: p.stat().st_mtime for p in out.glob("runs/*/run.json")}
    time.sleep(0.05)
    proc2 = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert proc2.returncode == 0, proc2.stdout[-3000:] + proc2.stderr[-3000:]
    assert "2 already done, 0 to run" in proc2.stdout
    assert "[1/2]" not in proc2.stdout
    assert {p: p.stat().st_mtime for p in out.glob("runs/*/run.json")} == stamps


def _check_dpsgd_run(ws):
    """The DP-SGD job's one simulator round: record-level accounting at the sites and the server."""
    from flare_helpers import load_json, read_scalars, run_dir

    rd = run_dir(ws)
    report = load_json(rd / "privacy_report.json")
    assert report["update_level"] is False and report["sites"] == {}  # no update-level filter in this job
    rec = report["record_level"]
    assert "record-level" in rec["unit"] and rec["target_epsilon"] == 8.0
    assert set(rec["sites"]) == {"site-1", "site-2"}
    for site, info in rec["sites"].items():
        # one round of the one planned: the calibration spends (nearly) the whole budget
        assert 7.9 <= info["epsilon_rdp"] <= 8.0
        assert info["site_reported_epsilon_rdp"] == pytest.approx(info["epsilon_rdp"], rel=1e-9)
        assert info["rounds"] == [0] and info["steps"] == info["steps_per_round"] == 2  # q = 3/6, int(1/q)
        # the site's own record-level ledger (kept in the simulator workspace's local/, which
        # survives a re-run of the simulator in the same workspace)
        # (the run is on SimEnv: that workspace is <ws>/<job name>, the run folder's grandparent)
        ledger = load_json(rd.parent.parent / "local" / "adpfl_privacy" / site / "dpsgd_skin2d.json")
        assert ledger["entries"][-1]["epsilon_rdp"] == pytest.approx(info["epsilon_rdp"], rel=1e-9)
    scalars = read_scalars(rd / "tb_events")
    assert "privacy_record/site-1/epsilon_rdp" in scalars, sorted(scalars)
    # the DP-SGD training loss is an un-noised statistic of the private records: never sent
    assert not any(t.startswith("train/") for t in scalars), sorted(scalars)
    assert "val_local/dice_mean" in scalars


def test_report_names_the_record_of_each_task():
    """A 3D task's record-level row protects one patient, a 2D task's one image (report text and plot axis)."""
    from adpfl.experiments.report import record_unit

    assert record_unit("kidney3d") == "one patient" and record_unit("brain3d") == "one patient"
    assert record_unit("skin2d") == "one training image"
    assert record_unit("") == "one training record"
