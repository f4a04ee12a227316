"""Batch augmentation (adpfl.tasks.batch_augment): per-sample draws, image and label moved
together, MONAI's distribution, reproducible from the seed, inputs untouched."""

import pytest
import torch

from adpfl.tasks.base import get_task
from adpfl.tasks.batch_augment import BatchAugment


def _dihedral(img):
    """The 8 images a mirror / quarter-turn combination can make of a (C, H, W) image."""
    out = []
    for k in range(4):
        r = torch.rot90(img, k, dims=(1, 2))
        out += [r, r.flip(2)]
    return out


def test_skin2d_batch_draws_per_sample_and_moves_label_with_image():
    aug = get_task("skin2d").batch_augment(16)
    img = torch.arange(16 * 16, dtype=torch.float32).view(1, 1, 16, 16)
    x = img.repeat(256, 1, 1, 1)
    y = (x > 100).float()
    x0, y0 = x.clone(), y.clone()
    xa, ya = aug(x, y, torch.Generator().manual_seed(3))
    assert torch.equal(x, x0) and torch.equal(y, y0)  # inputs untouched
    assert torch.equal((xa > 100).float(), ya)  # the label followed its image
    variants = _dihedral(img[0])
    index = [next(i for i, v in enumerate(variants) if torch.equal(v, s)) for s in xa]  # each one a dihedral image
    counts = torch.bincount(torch.tensor(index), minlength=8)
    # MONAI's RandFlipd x2 then RandRotate90d(max_k=3), p = 0.5 each: identity, half turn and the two
    # axis mirrors 1/6 each, the quarter turns and the two diagonal mirrors 1/12 each (256 draws: 43 / 21)
    im = img[0]
    sixths = [im, torch.rot90(im, 2, dims=(1, 2)), im.flip(1), im.flip(2)]
    expected = torch.tensor([1 / 6 if any(torch.equal(v, w) for w in sixths) else 1 / 12 for v in variants]) * 256
    assert float(expected.sum()) == pytest.approx(256)
    assert ((counts - expected).abs() <= 4 * (expected * (1 - expected / 256)).sqrt()).all(), counts.tolist()
    again, _ = aug(x, y, torch.Generator().manual_seed(3))
    assert torch.equal(again, xa)  # reproducible from the seed


def test_3d_batch_intensity_jitter_and_flips_per_sample():
    task = get_task("kidney3d")
    aug = task.batch_augment(32)
    x = torch.rand(1, 1, 8, 8, 8).repeat(400, 1, 1, 1, 1)
    y = (x > 0.5).to(torch.uint8)
    xa, ya = aug(x, y, torch.Generator().manual_seed(0))
    assert ya.dtype == torch.uint8 and xa.dtype == torch.float32
    # undo the flips by matching the label, then read the intensity change off the image
    base = x[0]
    scale_shift = []
    for s in range(400):
        for dims in [(), (1,), (2,), (3,), (1, 2), (1, 3), (2, 3), (1, 2, 3)]:
            lab = y[0].flip(dims) if dims else y[0]
            if torch.equal(lab, ya[s]):
                ref = base.flip(dims) if dims else base
                a = ((xa[s] - xa[s].mean()) * (ref - ref.mean())).sum() / ((ref - ref.mean()) ** 2).sum()
                scale_shift.append((float(a), float((xa[s] - a * ref).mean())))
                break
    assert len(scale_shift) == 400
    scales = torch.tensor([a for a, _ in scale_shift])
    shifts = torch.tensor([b for _, b in scale_shift])
    assert (scales - 1).abs().max() <= 0.1 + 1e-4 and shifts.abs().max() <= 0.05 + 1e-4
    unscaled = float(((scales - 1).abs() < 1e-5).float().mean())
    unshifted = float((shifts.abs() < 1e-5).float().mean())
    assert 0.4 < unscaled < 0.6 and 0.4 < unshifted < 0.6  # each applied with probability 1/2


def test_batch_augment_matches_the_monai_transforms_it_stands_for():
    aug = get_task("brain3d").batch_augment(32)
    names = [type(t).__name__ for t in aug.monai_transforms()]
    assert names == ["RandFlipd"] * 3 + ["RandScaleIntensityd", "RandShiftIntensityd"]
    assert [type(t).__name__ for t in get_task("skin2d").batch_augment(32).monai_transforms()] == [
        "RandFlipd", "RandFlipd", "RandRotate90d"]


def test_batch_augment_rejects_bad_settings():
    with pytest.raises(ValueError, match="flip_axes"):
        BatchAugment(spatial_dims=2, flip_axes=(2,))
    with pytest.raises(ValueError, match="probability"):
        BatchAugment(spatial_dims=2, rot90_prob=1.5)
    with pytest.raises(ValueError, match="quarter turns"):
        get_task("skin2d").batch_augment((32, 48))
    with pytest.raises(ValueError, match="pair up"):
        BatchAugment(spatial_dims=2)(torch.zeros(2, 1, 4, 4), torch.zeros(3, 1, 4, 4), torch.Generator())


def test_local_trainer_augmentation_is_reproducible_from_the_torch_seed(tmp_path):
    """Same torch seed: the same shuffles and augmentation draws, the same trained weights; another
    seed trains differently (the draws are not fixed)."""
    import warnings

    from adpfl.data.datalist import load_site_datalist
    from adpfl.data.synthetic import ensure_site_data
    from adpfl.tasks.network import TaskNetwork
    from adpfl.training import LocalTrainer, TrainConfig

    ensure_site_data("skin2d", tmp_path, "site-1", num_train=4, num_val=1, size=16, seed=0)
    datalist = load_site_datalist(tmp_path, "site-1", task="skin2d")
    torch.manual_seed(0)
    init = TaskNetwork("skin2d").state_dict()
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = LocalTrainer(get_task("skin2d"), datalist,
                                   TrainConfig(local_epochs=1, batch_size=2, image_size=16, device="cpu", amp=False))

        def trained(seed):
            model = TaskNetwork("skin2d")
            model.load_state_dict(init)
            trainer._optimizer = None  # a fresh Adam each time
            torch.manual_seed(seed)
            trainer.train(model)
            return torch.cat([p.detach().flatten() for p in model.parameters()])

        a, b, c = trained(1), trained(1), trained(2)
        calls = []
        task_augment = trainer.augment
        trainer.augment = lambda x, y, g: calls.append(x.shape[0]) or task_augment(x, y, g)
        trained(1)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert calls == [2, 2]  # every training batch went through the task's augmentation
