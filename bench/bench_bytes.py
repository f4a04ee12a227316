"""Bytes per site per round on the wire, dense vs the sparse wire format, per keep fraction.

Usage: python bench/bench_bytes.py [--task skin2d] [--keep 1 0.5 0.2 0.1] [--policies random topk_public]

For each keep fraction p the site's real release path runs once (PrivacyPipeline.release_sparse
on a random update shaped like the task's UNet, then the ADPFilter's wire encoding), and the
reply's size is measured two ways: numpy array bytes, and the whole shareable serialised with
FLARE's fobs (what the client sends). Dense = the same release as a dense float32 DXO.
Checks sparse <= 1.3 * p * dense.
"""

import argparse

import numpy as np
import torch
from nvflare.apis.dxo import DXO, DataKind

from _machine import machine  # bench/ is on sys.path when a script runs
from adpfl.flare.privacy_filter import _wire_data
from adpfl.flare.sparse import SPARSE_KEY, decode_sparse, payload_nbytes, serialized_nbytes
from adpfl.privacy import PrivacyConfig, PrivacyLedger, PrivacyPipeline
from adpfl.tasks.network import TaskNetwork


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="skin2d")
    ap.add_argument("--keep", type=float, nargs="+", default=[1.0, 0.5, 0.2, 0.1])
    ap.add_argument("--policies", nargs="+", default=["random", "topk_public"])
    args = ap.parse_args()
    print(f"machine: {machine()}")
    model = TaskNetwork(args.task)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    numel = sum(int(np.prod(s)) for s in shapes.values())
    print(f"task {args.task}: UNet update of {numel:,} float32 parameters ({len(shapes)} tensors)")
    g = torch.Generator().manual_seed(0)
    update = {k: torch.randn(s, generator=g) * 1e-3 for k, s in shapes.items()}
    public = {k: torch.rand(s, generator=g) for k, s in shapes.items()}
    print(f"{'policy':<12} {'p':>5} {'coding':<12} {'dense arr B':>12} {'sparse arr B':>12} {'ratio/p':>8} "
          f"{'dense fobs B':>12} {'sparse fobs B':>13} {'ratio/p':>8}  <=1.3p")
    ok = True
    for policy in args.policies:
        for p in args.keep:
            mode = "adpfl"
            cfg = PrivacyConfig(mode=mode, keep_fraction=p, mask_policy=policy if p < 1 else "random", clip_norm=2.0,
                                clip_learning_rate=0.2, clip_indicator_noise=1.0, target_epsilon=1e5, delta=1e-5,
                                planned_rounds=5, track_prv=False)
            sp, meta = PrivacyPipeline(cfg, PrivacyLedger(delta=1e-5)).release_sparse(
                update, 0, public_scores=public if policy == "topk_public" else None)
            wire = _wire_data(sp)
            dense = {k: v.numpy() for k, v in sp.to_dense().items()}
            if SPARSE_KEY in wire:  # sanity: the server's densify gives back the dense release
                back = decode_sparse(wire, meta["kept_coordinates"])
                assert all(np.array_equal(back[k], dense[k]) for k in dense)
                coding = wire[SPARSE_KEY]["index_coding"]
            else:
                coding = "dense"
            da, sa = payload_nbytes(dense), payload_nbytes(wire)
            df = serialized_nbytes(DXO(DataKind.WEIGHT_DIFF, data=dense, meta={"m": meta}))
            sf = serialized_nbytes(DXO(DataKind.WEIGHT_DIFF, data=wire, meta={"m": meta}))
            good = sf <= 1.3 * p * df and sa <= 1.3 * p * da
            ok &= good
            print(f"{policy:<12} {p:>5.2f} {coding:<12} {da:>12,} {sa:>12,} {sa / da / p:>8.3f} {df:>12,} {sf:>13,} "
                  f"{sf / df / p:>8.3f}  {'yes' if good else 'NO'}")
    print("all within 1.3 * p * dense" if ok else "SOME ABOVE 1.3 * p * dense")


if __name__ == "__main__":
    main()
