"""Command line for the data layer.

``python -m adpfl.data synth --task skin2d --data-root DIR --sites 3 [--num-train N ...]``
    generate (or reuse, see ``ensure_site_data``) synthetic sites ``site-1..site-N``.
``python -m adpfl.data prepare --task kidney3d --source-root KITS --out-root DIR --sites 3``
    split a public dataset into per-site datalists (see ``adpfl.data.public``).
``python -m adpfl.data validate --data-root DIR --site site-1 [--task T]``
    load and validate one site's datalist.
"""

from __future__ import annotations

import argparse
import sys
import time

from adpfl.tasks.base import TASK_NAMES as TASKS
from .errors import DataError


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m adpfl.data", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("synth", help="generate synthetic sites")
    s.add_argument("--task", required=True, choices=TASKS)
    s.add_argument("--data-root", required=True)
    s.add_argument("--sites", type=int, default=3)
    s.add_argument("--num-train", type=int, default=None)
    s.add_argument("--num-val", type=int, default=None)
    s.add_argument("--size", type=int, default=None)
    s.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("prepare", help="split a public dataset into site datalists")
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--source-root", default=None)
    p.add_argument("--images-dir", default=None)
    p.add_argument("--masks-dir", default=None)
    p.add_argument("--metadata-csv", default=None)
    p.add_argument("--out-root", required=True)
    p.add_argument("--sites", type=int, default=3)
    p.add_argument("--scheme", default="iid", choices=("iid", "column", "skewed"))
    p.add_argument("--column", default=None)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--no-validate", action="store_true")
    v = sub.add_parser("validate", help="validate one site's datalist and files")
    v.add_argument("--data-root", required=True)
    v.add_argument("--site", required=True)
    v.add_argument("--task", default=None, choices=TASKS)
    v.add_argument("--deep", action="store_true")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "synth":
            from .synthetic import ensure_site_data

            for i in range(1, args.sites + 1):
                t0 = time.perf_counter()
                path = ensure_site_data(args.task, args.data_root, f"site-{i}",
                                        num_train=args.num_train, num_val=args.num_val,
                                        size=args.size, seed=args.seed)
                print(f"{path}  ({time.perf_counter() - t0:.2f} s)")
        elif args.cmd == "prepare":
            from .public import prepare_public_dataset

            paths = prepare_public_dataset(
                args.task, args.source_root, args.out_root, args.sites, scheme=args.scheme,
                seed=args.seed, val_fraction=args.val_fraction, column=args.column,
                metadata_csv=args.metadata_csv, images_dir=args.images_dir,
                masks_dir=args.masks_dir, validate=not args.no_validate, alpha=args.alpha)
            for path in paths:
                print(path)
        else:
            from .datalist import load_site_datalist, validate_site

            summary = validate_site(load_site_datalist(args.data_root, args.site, args.task),
                                    deep=args.deep)
            print(summary)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
