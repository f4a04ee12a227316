"""The round printer, the curves and the privacy card as pure functions on a saved run's
records, and the Recipe route's environments (no simulator run here)."""

import pytest

from adpfl.experiments.bundle import card_text, privacy_card
from adpfl.flare.run_view import fmt_duration, format_row, plot_rounds, privacy_legend, round_rows
from adpfl.privacy.policy import UNCOVERED, UNIT


def _progress():
    return {"task": "skin2d", "mode": "adpfl", "num_rounds": 3, "start_round": 0, "last_completed_round": 1,
            "settings": {"sites": ["site-1", "site-2"], "executor": {"image_size": 32, "num_train": 6, "num_val": 3},
                         "privacy": {"keep_fraction": 0.5, "clip_norm": 2.0}},
            "history": [{"round": 0, "dice": {"site-1": 0.2, "site-2": 0.4}, "time": 10.0},
                        {"round": 1, "dice": {"site-1": 0.5, "site-2": 0.7}, "time": 20.0}]}


def _report():
    def ledger(e0, e1):
        return [{"round": 0, "epsilon_rdp": e0, "noise_multiplier": 0.01, "clip_norm": 2.0, "keep_fraction": 0.5,
                 "mask_policy": "topk_public", "mechanism": "gaussian"},
                {"round": 1, "epsilon_rdp": e1, "noise_multiplier": 0.01, "clip_norm": 1.5, "keep_fraction": 0.5,
                 "mask_policy": "topk_public", "mechanism": "gaussian"}]

    return {"unit": UNIT, "update_level": True, "record_level": None, "delta": 1e-5, "target_epsilon": 100.0,
            "planned_rounds": 3, "noise_type": "gaussian", "accountants": {"epsilon_rdp": "Opacus RDPAccountant"},
            "sites": {"site-1": {"releases": 2, "epsilon_rdp": 30.0, "epsilon_prv": None, "epsilon_exact": 28.0,
                                 "ledger": ledger(10.0, 30.0)},
                      "site-2": {"releases": 1, "epsilon_rdp": 12.0, "epsilon_prv": None, "epsilon_exact": 11.0,
                                 "ledger": ledger(12.0, 12.0)[:1]}},
            "stopped_early": False, "stop_reason": None, "rejected_contributions": [], "not_covered": UNCOVERED}


def test_round_rows_pair_each_rounds_dice_with_the_epsilon_spent_by_then():
    rows = round_rows(_progress(), _report())
    assert [r["round"] for r in rows] == [0, 1]
    assert rows[0]["mean_dice"] == pytest.approx(0.3) and rows[1]["mean_dice"] == pytest.approx(0.6)
    assert rows[0]["epsilon"] == {"site-1": 10.0, "site-2": 12.0}
    # site-2 released nothing in round 1: its spend stays at round 0's
    assert rows[1]["epsilon"] == {"site-1": 30.0, "site-2": 12.0}
    assert round_rows(None, None) == [] and round_rows(_progress(), None)[0]["epsilon"] == {}


def test_record_level_epsilon_per_round_and_legend_units():
    rep = {"update_level": False, "record_level": {"delta": 1e-5, "sites": {
        "site-1": {"epsilon_rdp": 3.0, "epsilon_rdp_by_round": {"0": 2.0, "1": 3.0}}}}}
    rows = round_rows(_progress(), rep)
    assert [r["record_epsilon"] for r in rows] == [{"site-1": 2.0}, {"site-1": 3.0}] and rows[0]["epsilon"] == {}
    assert "record-level DP-SGD (one image/patient), delta=1e-05, RDP" in privacy_legend(rep)
    assert "site-level update DP (replace-one), delta=1e-05, RDP" in privacy_legend(_report())
    assert "without differential privacy" in privacy_legend(None)


def test_a_report_behind_the_progress_is_never_shown_as_the_rounds_epsilon():
    """The privacy report is written after the progress record: until it holds the round,
    the row says how old its epsilons are (a loaded machine printed round 2 with round 1's)."""
    rep = {"update_level": False, "record_level": {"delta": 1e-5, "sites": {
        "site-1": {"epsilon_rdp": 2.0, "epsilon_rdp_by_round": {"0": 2.0}}}}}
    rows = round_rows(_progress(), rep)
    assert rows[0]["epsilon_as_of"] is None and rows[1]["epsilon_as_of"] == 0
    assert "eps site-1 2 (privacy report as of round 1)" in format_row(rows[1], 3, 2.0, 2, 1)
    # a site that released nothing in round 1 while another did: the report is current
    assert round_rows(_progress(), _report())[1]["epsilon_as_of"] is None


def test_format_row_is_one_line_with_round_dice_epsilon_elapsed_and_eta():
    row = round_rows(_progress(), _report())[0]
    line = format_row(row, 3, elapsed=65.0, rounds_done=1, rounds_left=2)
    assert line == "round 1/3  Dice 0.300  eps site-1 10 site-2 12  1m05s elapsed, ETA 2m10s"
    assert "Dice   n/a" in format_row(dict(row, mean_dice=None), 3, 1.0, 0, 3)
    assert fmt_duration(3725) == "1h02m" and fmt_duration(None) == "?"


def test_plot_rounds_writes_a_png_and_nothing_without_rounds(tmp_path):
    rows = round_rows(_progress(), _report())
    out = plot_rounds(rows, {"site-1": 0.8}, tmp_path / "r.png", title="t", legend=privacy_legend(_report()))
    assert out and (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
    assert plot_rounds([], {}, tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()


def test_privacy_card_copies_the_report():
    report, progress = _report(), _progress()
    card = privacy_card(report, progress, "skin2d", "adpfl")
    assert card["units"] == [{"level": "update", "unit": UNIT}]
    assert card["epsilon_per_site"]["update_level"]["site-1"]["epsilon_rdp"] == 30.0
    assert card["delta"] == {"update_level": 1e-5} and card["target_epsilon"] == {"update_level": 100.0}
    assert card["not_covered"] == UNCOVERED and card["sites"] == ["site-1", "site-2"]
    assert card["rounds"] == {"planned": 3, "completed": 2, "start_round": 0, "stopped_early": False,
                              "stop_reason": None}
    assert card["mechanism"]["last_release_per_site"]["site-1"]["clip_norm"] == 1.5
    assert card["data"]["image_size"] == [32, 32] and card["data"]["channels"] == ["R", "G", "B"]
    assert "site-1: epsilon (RDP) 30.0" in card_text(card, "32x32")
    none = privacy_card(None, progress, "skin2d", "npfl")
    assert none["units"] == [] and none["not_covered"][1:] == UNCOVERED


def test_export_refuses_a_private_run_without_its_report(tmp_path):
    import json

    from adpfl.experiments.bundle import ExportError, export_bundle

    with pytest.raises(ExportError, match="is not a folder"):
        export_bundle(tmp_path / "nope", tmp_path / "b")
    rd = tmp_path / "run"
    (rd / "app_server").mkdir(parents=True)
    with pytest.raises(ExportError, match="run_progress.json missing"):
        export_bundle(rd, tmp_path / "b")
    (rd / "run_progress.json").write_text(json.dumps(_progress()))
    (rd / "app_server" / "FL_global_model.pt").write_bytes(b"")
    with pytest.raises(ExportError, match="privacy_report.json missing"):
        export_bundle(rd, tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_recipe_environments_and_sites(tmp_path):
    from nvflare.recipe import PocEnv, ProdEnv, SimEnv

    from adpfl.flare.recipe import make_env, site_names

    assert site_names(2, None) == ["site-1", "site-2"] and site_names(3, "a, b") == ["a", "b"]
    sim = make_env("sim", clients=["site-1", "site-2"], workspace=str(tmp_path / "ws"))
    assert isinstance(sim, SimEnv) and sim.workspace_root == str(tmp_path / "ws") and sim.num_threads == 2
    kit = tmp_path / "admin"
    kit.mkdir()
    prod = make_env("prod", clients=["h-a"], startup_kit=str(kit), username="admin@x.org")
    assert isinstance(prod, ProdEnv) and prod.startup_kit_location == str(kit) and prod.username == "admin@x.org"
    assert isinstance(make_env("poc", clients=["site-1", "site-2"]), PocEnv)
    with pytest.raises(ValueError, match="needs --startup-kit"):
        make_env("prod", clients=["a"])
    with pytest.raises(ValueError, match="is not a folder"):
        make_env("prod", clients=["a"], startup_kit=str(tmp_path / "missing"))


def test_recipe_exports_the_checked_in_job(tmp_path):
    """The Recipe is the one job definition: its export is the checked-in job folder."""
    import json
    from pathlib import Path

    from adpfl.flare.recipe import ADPFLRecipe

    recipe = ADPFLRecipe("skin2d", "dpsgd")
    recipe.export(str(tmp_path))
    repo = Path(__file__).resolve().parents[1] / "jobs" / "skin2d_dpsgd"
    for rel in ("meta.json", "app/config/config_fed_server.json", "app/config/config_fed_client.json"):
        assert json.loads((tmp_path / "skin2d_dpsgd" / rel).read_text()) == json.loads((repo / rel).read_text()), rel
    assert recipe.settings["sites"] == ["site-1", "site-2", "site-3"]


def test_recipe_waits_for_the_sites_it_runs_unless_told_more(tmp_path, capsys):
    """`-n 2` without min_clients: the job waits for those 2 sites (the default 3 would never
    be met); an explicit min_clients above the sites is a clear error before anything starts."""
    import json

    from adpfl.flare.recipe import main

    settings = tmp_path / "o.json"
    settings.write_text(json.dumps({"min_clients": 3}))
    assert main(["--task", "skin2d", "--mode", "npfl", "-n", "2", "--overrides", str(settings)]) == 2
    assert "needs min_clients=3 sites but runs 2" in capsys.readouterr().err
