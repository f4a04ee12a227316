"""The settings registry: every FLARE component's job-config surface, from the config dataclasses.

A component's constructor arguments are its settings in a job folder. Their names, defaults,
units and help texts are defined once, on the fields of the config dataclasses
(``metadata={"help": ..., "unit": ...}``): :class:`~adpfl.training.site.SiteConfig`,
:class:`~adpfl.training.TrainConfig`, :class:`~adpfl.training.dpsgd.DPSGDConfig`,
:class:`~adpfl.privacy.pipeline.PrivacyConfig` and, for the settings that only a FLARE
component has, the small dataclasses below. :data:`COMPONENTS` says which field each
constructor argument is; from it come

- the defaults ``flare/jobs.py`` starts every job from (:func:`defaults`),
- the README's settings tables (:func:`render_table`, between ``<!-- settings:<key> -->``
  markers), checked by ``tests/test_settings_table.py`` and rewritten by
  ``python -m adpfl.settings --write README.md``.

The FLARE components themselves default their arguments from the same dataclasses; the test
also checks that each signature lists exactly the registry's arguments with its defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import re
import sys
from dataclasses import dataclass, field
from typing import Any

__all__ = ["COMPONENTS", "Setting", "settings", "defaults", "render_table", "update_readme", "main"]


# ---- settings only a FLARE component has (no pure-layer config holds them) -------------------
@dataclass
class ExecutorTaskNames:
    """The FLARE task names the site executor serves."""

    train_task_name: str = field(default="train", metadata={"help": "FLARE task name of local training"})
    validate_task_name: str = field(default="validate", metadata={
        "help": "FLARE task name of validating received weights (cross-site evaluation)"})


@dataclass
class FilterSiteSettings:
    """Where the update-level filter keeps its ledger and runs (site-side, not privacy math)."""

    ledger_name: str = field(default="privacy_ledger", metadata={
        "help": "file name of the site's update-level ledger (one ledger per site and dataset)"})
    ledger_dir: str = field(default="", metadata={
        "help": "folder of the ledger; the site's `local/adpfl_site.json` or `$ADPFL_LEDGER_DIR` override it "
                "(empty: the site workspace)", "unit": "path"})
    device: str = field(default="auto", metadata={
        "help": "where the pipeline runs: `auto` (the GPU when there is one), `cpu` or `cuda[:N]`"})


@dataclass
class AccountingWidgetSettings:
    """The server's checks and outputs beyond the budget it mirrors."""

    min_noise_multiplier: float = field(default=0.0, metadata={
        "help": "contributions claiming a smaller noise multiplier are rejected (the job's noise floor)",
        "unit": "z (noise std / sensitivity)"})
    report_name: str = field(default="privacy_report.json", metadata={
        "help": "the report written into the job's run folder"})
    stop_on_budget: bool = field(default=True, metadata={
        "help": "end the run cleanly before a round that would exceed a site's budget"})
    update_level: bool = field(default=True, metadata={
        "help": "require update-level privacy metadata (off in `dpsgd` jobs)"})
    record_level: bool = field(default=False, metadata={
        "help": "require DP-SGD metadata; each site's record-level epsilon is recomputed from its "
                "(z, q, steps) history and a result over the budget is rejected"})


@dataclass
class InitialModelSettings:
    """Where the job's initial global model comes from (the server's persistor builds it; the
    in-process runner the same way). Sites receive it as round 0's global model."""

    initial_checkpoint: str | None = field(default=None, metadata={
        "help": "warm start: a checkpoint trained only on declared public data (`adpfl pretrain-public`; its "
                "`.provenance.json` must say `public: true` and match the weights' sha256, task and network); "
                "read where the initial model is built (the server; the sites never read it); costs no site's "
                "privacy budget (None: random initial weights)", "unit": "path"})


# ---- the registry ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Setting:
    """One constructor argument of a component: which dataclass field it is."""

    arg: str
    owner: type
    field_name: str

    @property
    def field(self) -> dataclasses.Field:
        return {f.name: f for f in dataclasses.fields(self.owner)}[self.field_name]

    @property
    def default(self) -> Any:
        f = self.field
        return f.default_factory() if f.default is dataclasses.MISSING else f.default

    @property
    def help(self) -> str:
        return self.field.metadata.get("help", "")

    @property
    def unit(self) -> str:
        return self.field.metadata.get("unit", "")


def _group(owner: str, names: str, prefix: str = "", rename: dict[str, str] | None = None) -> list[tuple]:
    rename = rename or {}
    return [(prefix + rename.get(n, n), owner, n) for n in names.split()]


#: component key -> (import path of the component, its table title, its arguments in signature
#: order as (argument, "module:Class" of the dataclass, field)). Classes are imported lazily:
#: the registry itself must not pull FLARE into pure code.
_SITE, _TRAIN = "adpfl.training.site:SiteConfig", "adpfl.training.loop:TrainConfig"
_DPSGD, _PRIV = "adpfl.privacy.config:DPSGDConfig", "adpfl.privacy.config:PrivacyConfig"
_HERE = __name__
COMPONENTS: dict[str, dict] = {
    "executor": {
        "component": "adpfl.flare.executor:SegmentationExecutor",
        "args": _group(_SITE, "task network data_root synthetic data_size num_train num_val")
        + _group(_TRAIN, "image_size")
        + _group(_SITE, "data_seed")
        + _group(_TRAIN, "local_epochs batch_size learning_rate max_steps_per_round trainable amp device "
                         "num_workers seed")
        + _group(_SITE, "hd95 dpsgd")
        + _group(_DPSGD, "target_epsilon delta max_grad_norm noise_multiplier planned_rounds", prefix="dpsgd_")
        + _group(_DPSGD, "adaptive clip_quantile clip_learning_rate clip_count_noise noise_min_factor "
                         "noise_max_factor keep_fraction augmult ema_decay physical_batch_size public_num_records "
                         "lr_schedule lr_final_factor ema_warmup",
                  prefix="dpsgd_")
        + _group(_SITE, "dpsgd_ledger_name ledger_dir")
        + _group(f"{_HERE}:ExecutorTaskNames", "train_task_name validate_task_name")
        + _group(f"{_HERE}:InitialModelSettings", "initial_checkpoint"),
    },
    "filter": {
        "component": "adpfl.flare.privacy_filter:ADPFilter",
        "args": _group(_PRIV, "mode target_epsilon delta planned_rounds keep_fraction mask_policy clip_norm "
                              "clip_percentile clip_learning_rate clip_indicator_noise clip_min clip_max "
                              "noise_multiplier noise_type noise_min_factor noise_max_factor accountant track_prv")
        + _group(f"{_HERE}:FilterSiteSettings", "ledger_name ledger_dir device"),
    },
    "widget": {
        "component": "adpfl.flare.privacy_widget:PrivacyAccountingWidget",
        "args": _group(_PRIV, "target_epsilon delta planned_rounds noise_type")
        + _group(f"{_HERE}:AccountingWidgetSettings", "min_noise_multiplier report_name stop_on_budget "
                                                       "update_level record_level")
        + _group(_DPSGD, "target_epsilon delta", prefix="record_"),
    },
}

def _load(path: str):
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def settings(key: str) -> list[Setting]:
    """The registry's settings of component ``key`` (executor, filter, widget), in order."""
    if key not in COMPONENTS:
        raise ValueError(f"unknown component {key!r}; known: {sorted(COMPONENTS)}")
    return [Setting(arg, _load(owner), name) for arg, owner, name in COMPONENTS[key]["args"]]


def defaults(key: str) -> dict[str, Any]:
    """{argument: default} of component ``key`` from the dataclasses."""
    return {s.arg: s.default for s in settings(key)}


def component(key: str):
    return _load(COMPONENTS[key]["component"])


def signature_defaults(key: str) -> dict[str, Any]:
    """{argument: default} as the component's constructor declares them."""
    params = inspect.signature(component(key).__init__).parameters
    return {n: p.default for n, p in params.items() if n != "self" and p.kind is p.POSITIONAL_OR_KEYWORD}


# ---- rendering -------------------------------------------------------------------------------
def _fmt(value: Any) -> str:
    if value is None:
        return "None"
    if isinstance(value, str):
        return f'`"{value}"`'
    return f"`{value!r}`"


def render_table(key: str) -> str:
    """The markdown table of component ``key``: setting, default (what the component's
    constructor declares), unit, meaning."""
    defaults_declared = signature_defaults(key)
    rows = ["| setting | default | unit | meaning |", "|---|---|---|---|"]
    for s in settings(key):
        default = defaults_declared.get(s.arg, s.default)
        help_text = s.help.replace("|", "\\|")
        rows.append(f"| `{s.arg}` | {_fmt(default)} | {s.unit} | {help_text} |")
    return "\n".join(rows) + "\n"


def _block_re(key: str) -> re.Pattern:
    return re.compile(rf"(<!-- settings:{key} -->\n)(.*?)(<!-- /settings:{key} -->)", re.S)


def readme_block(text: str, key: str) -> str | None:
    """The text between the component's markers in ``text`` (None when they are missing)."""
    m = _block_re(key).search(text)
    return m.group(2) if m else None


def update_readme(text: str) -> str:
    """``text`` with every component's block replaced by a fresh rendering."""
    for key in COMPONENTS:
        if readme_block(text, key) is None:
            raise ValueError(f"the README has no <!-- settings:{key} --> ... <!-- /settings:{key} --> block")
        table = render_table(key)
        text = _block_re(key).sub(lambda m, table=table: m.group(1) + table + m.group(3), text)
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m adpfl.settings", description=__doc__.splitlines()[0])
    p.add_argument("readme", nargs="?", help="README to check (default) or rewrite (--write)")
    p.add_argument("--write", action="store_true", help="rewrite the README's settings tables in place")
    p.add_argument("--component", choices=sorted(COMPONENTS), help="print one component's table")
    args = p.parse_args(argv)
    if args.component or not args.readme:
        for key in [args.component] if args.component else COMPONENTS:
            print(f"<!-- settings:{key} -->\n{render_table(key)}<!-- /settings:{key} -->")
        return 0
    with open(args.readme) as f:
        text = f.read()
    try:
        fresh = update_readme(text)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.write:
        if fresh != text:
            with open(args.readme, "w") as f:
                f.write(fresh)
        print(f"{args.readme}: settings tables {'rewritten' if fresh != text else 'already current'}")
        return 0
    if fresh != text:
        print(f"{args.readme}: settings tables differ from the registry; run "
              f"`python -m adpfl.settings --write {args.readme}`", file=sys.stderr)
        return 1
    print(f"{args.readme}: settings tables match the registry")
    return 0


if __name__ == "__main__":
    sys.exit(main())
