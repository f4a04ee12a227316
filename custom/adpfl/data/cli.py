"""``adpfl data ...``: the data layer's sub-commands (registered on the ``adpfl`` parser).

``adpfl data generate --task skin2d --data-root DIR --sites 3 [--num-train N ...]``
    generate (or reuse, see ``ensure_site_data``) synthetic sites ``site-1..site-N``.
``adpfl data prepare --task kidney3d --source-root KITS --out-root DIR --sites 3``
    split a public dataset into per-site datalists (see ``adpfl.data.public``).
``adpfl data validate --data-root DIR --site site-1 [--task T]``
    load and validate one site's datalist.

A :class:`~adpfl.data.errors.DataError` (a ``ValueError``) is printed as one line by
``adpfl``'s main, exit code 2.
"""

from __future__ import annotations

import time

from adpfl.tasks.base import TASK_NAMES


def cmd_generate(args) -> int:
    from .synthetic import ensure_site_data

    t0 = time.perf_counter()
    for i in range(1, args.sites + 1):
        p = ensure_site_data(
            args.task, args.data_root, f"site-{i}", num_train=args.num_train, num_val=args.num_val,
            size=args.size or None, seed=args.seed,
        )
        print(f"site-{i}: {p}")
    print(f"done in {time.perf_counter() - t0:.1f}s")
    return 0


def cmd_prepare(args) -> int:
    from .public import prepare_public_dataset

    paths = prepare_public_dataset(
        args.task, args.source_root, args.out_root, args.sites, scheme=args.scheme,
        seed=args.seed, val_fraction=args.val_fraction, column=args.column,
        metadata_csv=args.metadata_csv, images_dir=args.images_dir,
        masks_dir=args.masks_dir, validate=not args.no_validate, alpha=args.alpha)
    for path in paths:
        print(path)
    return 0


def cmd_validate(args) -> int:
    from .datalist import load_site_datalist, validate_site

    print(validate_site(load_site_datalist(args.data_root, args.site, args.task), deep=args.deep))
    return 0


def add_parser(sub) -> None:
    """Register ``adpfl data ...`` on the ``adpfl`` command's sub-parsers."""
    d = sub.add_parser("data", help="data preparation")
    dsub = d.add_subparsers(dest="data_command", required=True)

    g = dsub.add_parser("generate", help="write the synthetic data of N sites")
    g.add_argument("--task", default="skin2d", choices=TASK_NAMES)
    g.add_argument("--data-root", required=True, help="the task's data folder (<root>/<site>/datalist.json)")
    g.add_argument("--sites", type=int, default=3)
    g.add_argument("--num-train", type=int, default=40)
    g.add_argument("--num-val", type=int, default=20)
    g.add_argument("--size", type=int, default=0, help="image size (default 0: the task's default size)")
    g.add_argument("--seed", type=int, default=0)
    g.set_defaults(func=cmd_generate)

    p = dsub.add_parser("prepare", help="split a public dataset (ISIC/HAM10000, KiTS23, BraTS 2024) into site "
                                        "datalists")
    p.add_argument("--task", required=True, choices=TASK_NAMES)
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
    p.set_defaults(func=cmd_prepare)

    v = dsub.add_parser("validate", help="check a site's datalist and files")
    v.add_argument("--data-root", required=True)
    v.add_argument("--site", required=True)
    v.add_argument("--task", default=None, choices=TASK_NAMES)
    v.add_argument("--deep", action="store_true")
    v.set_defaults(func=cmd_validate)
