"""The `adpfl` command is one argparse tree: every sub-command is parsed by it (no argv
sniffing, no second parser) and runs its own function."""

import argparse

from adpfl.cli import build_parser, main


def _leaves(parser, path=()):
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
        return
    for name, child in subs[0].choices.items():
        yield from _leaves(child, path + (name,))


def test_every_sub_command_is_a_leaf_of_the_one_tree_with_its_function():
    leaves = dict(_leaves(build_parser()))
    for expected in [("run",), ("summary",), ("jobs", "export"), ("data", "generate"), ("data", "prepare"),
                     ("data", "validate"), ("poc", "prepare"), ("poc", "run"), ("compare",), ("report",)]:
        assert expected in leaves, sorted(leaves)
    for path, parser in leaves.items():
        assert callable(parser.get_default("func")), path


def test_data_commands_go_through_the_tree(tmp_path, capsys):
    args = build_parser().parse_args(["data", "validate", "--data-root", str(tmp_path), "--site", "site-1"])
    assert args.func.__module__ == "adpfl.data.cli"
    assert main(["data", "validate", "--data-root", str(tmp_path / "missing"), "--site", "site-1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("adpfl: error: ") and str(tmp_path / "missing") in err and "Traceback" not in err
    assert main(["data", "generate", "--task", "skin2d", "--data-root", str(tmp_path / "d"), "--sites", "1",
                 "--num-train", "2", "--num-val", "1", "--size", "16"]) == 0
    assert main(["data", "validate", "--data-root", str(tmp_path / "d"), "--site", "site-1"]) == 0
    assert "'num_training': 2" in capsys.readouterr().out
