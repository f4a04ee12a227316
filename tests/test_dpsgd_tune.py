"""bench/dpsgd_tune.py's warm start: every row starts from the public checkpoint of its own network."""

import pytest

from bench_scripts import load_bench


@pytest.fixture(scope="module")
def tune():
    return load_bench("dpsgd_tune")


def test_rows_get_the_checkpoint_of_their_network(tune):
    cfgs = tune.search_configs([1e-3, 3e-3], [32], num_train=3300, epochs_per_round=0.25)
    warm = tune.with_initial_checkpoints(cfgs, {"standard": "/p/std.pt", "dp": "/p/dp.pt"})
    assert set(warm) == set(cfgs)
    assert warm["npfl"][1]["initial_checkpoint"] == "/p/std.pt"  # NP-FL trains the standard network
    for name in ("b32_lr0.001", "b32_lr0.003"):
        mode, extra = warm[name]
        assert mode == "dpsgd" and extra["network"] == "dp" and extra["initial_checkpoint"] == "/p/dp.pt"
        # nothing else of the row changes (same step cap, batch, learning rate)
        assert {k: v for k, v in extra.items() if k != "initial_checkpoint"} == cfgs[name][1]
    assert "initial_checkpoint" not in cfgs["npfl"][1]  # the input rows are not modified


def test_no_checkpoints_leaves_rows_unchanged(tune):
    cfgs = tune.search_configs([1e-2], [32], num_train=3300, epochs_per_round=0.25)
    assert tune.with_initial_checkpoints(cfgs, {}) == cfgs


def test_a_network_without_checkpoint_is_refused_naming_the_option(tune):
    cfgs = tune.search_configs([1e-2], [32], num_train=3300, epochs_per_round=0.25)
    with pytest.raises(SystemExit, match="--initial-checkpoint: row b32_lr0.01 trains the 'dp' network"):
        tune.with_initial_checkpoints(cfgs, {"standard": "/p/std.pt"})


def test_row_epochs_count_what_the_trainer_runs(tune):
    """A row's epochs are its steps a round x batch over the rounds, and a round never trains more
    than local_epochs epochs whatever its step cap (52 steps of 128 over 3,300 images are 25 steps
    at local_epochs 1: 4 epochs over 4 rounds, not 8)."""
    row = {"batch_size": 32, "max_steps_per_round": 52, "local_epochs": 1}
    assert tune.row_epochs(row, 3300, 4) == 2.0
    assert tune.row_epochs({**row, "batch_size": 128}, 3300, 4) == 4.0
    assert tune.row_epochs({**row, "batch_size": 128, "local_epochs": 2}, 3300, 4) == 7.75  # 50 steps a round
    assert tune.row_epochs({**row, "batch_size": 64, "max_steps_per_round": 104, "local_epochs": 2}, 3300, 4) == 8.0


def test_the_reference_is_the_best_npfl_row_of_the_same_epochs(tune):
    rows = [{"epochs": 8, "dice": 0.645, "dice_key": 0.78}, {"epochs": 8, "dice": 0.718, "dice_key": 0.82},
            {"epochs": 8, "dice": 0.70, "dice_key": 0.85}, {"epochs": 16, "dice": 0.5, "dice_key": None}]
    refs, refs_key = tune.npfl_references(rows)
    assert refs == {8: 0.718, 16: 0.5}
    assert refs_key == {8: 0.82, 16: None}  # the key-region figure of that same row
