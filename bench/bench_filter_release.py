"""Time the ADPFilter end to end (numpy update in -> protected shareable out) per release.

This is what a site pays per round: numpy -> torch, the privacy pipeline with the job's
default DP-FL / ADP-FL settings, ledger write, wire encoding. Default update: 6.5M
parameters (a 2D UNet of the paper's size).

    python bench/bench_filter_release.py [--params 6500000] [--repeats 7] [--device auto]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=float, default=6.5e6)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--modes", nargs="+", default=["dpfl", "adpfl"])
    args = ap.parse_args()

    from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
    from nvflare.apis.fl_constant import ReservedKey
    from nvflare.apis.fl_context import FLContext
    from nvflare.app_common.app_constant import AppConstants

    from adpfl.flare.executor import PUBLIC_INFO_PROP
    from adpfl.flare.jobs import job_settings
    from adpfl.flare.privacy_filter import ADPFilter

    n = int(args.params)
    rng = np.random.default_rng(0)
    sizes = [n // 4, n // 4, n // 8, n - (n // 4) * 2 - n // 8]
    update = {f"layer{i}.weight": (rng.standard_normal(s) * 1e-3).astype(np.float32) for i, s in enumerate(sizes)}
    scores = {k: np.abs(rng.standard_normal(v.shape)).astype(np.float32) for k, v in update.items()}
    dev = (
        "cuda"
        if (args.device == "auto" and torch.cuda.is_available())
        else ("cpu" if args.device == "auto" else args.device)
    )
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPU threads, torch threads {torch.get_num_threads()}, "
          f"device {dev}{' ' + torch.cuda.get_device_name() if dev.startswith('cuda') else ''}; "
          f"update {n:,} parameters")
    for mode in args.modes:
        privacy = job_settings("skin2d", mode, num_rounds=10_000)["privacy"]
        privacy.update(ledger_dir=tempfile.mkdtemp(prefix="adpfl_bench_"), device=dev, track_prv=False)
        f = ADPFilter(**privacy)
        times = []
        for r in range(args.repeats + 1):
            s = DXO(DataKind.WEIGHT_DIFF, data=update, meta={MetaKey.NUM_STEPS_CURRENT_ROUND: 1}).to_shareable()
            s.set_header(AppConstants.CURRENT_ROUND, r)
            ctx = FLContext()
            ctx.set_prop(ReservedKey.IDENTITY_NAME, "site-1", private=False, sticky=True)
            ctx.set_prop(ReservedKey.RUN_NUM, "bench", private=False, sticky=True)
            ctx.set_prop(PUBLIC_INFO_PROP, {"round": r, "global_change": 0.1, "public_scores": scores},
                         private=True, sticky=False)
            if dev.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = f.process(s, ctx)
            if dev.startswith("cuda"):
                torch.cuda.synchronize()
            dt = (time.perf_counter() - t0) * 1e3
            assert from_shareable(out).data, "release refused"
            if r > 0:  # the first release includes set-up (ledger creation, calibration)
                times.append(dt)
        print(f"{mode}: keep_fraction={privacy['keep_fraction']} mask={privacy.get('mask_policy', 'none')}: "
              f"median {statistics.median(times):.1f} ms, min {min(times):.1f} ms over {len(times)} releases")


if __name__ == "__main__":
    main()
