import math

import pytest
import torch

from adpfl.privacy import (
    add_gaussian_noise,
    add_laplace_noise,
    clip_l1,
    clip_l2,
    flatten_update,
    make_generator,
    sparsify_mask,
    unflatten_update,
)
from adpfl.privacy.mechanisms import keep_count


def test_flatten_roundtrip_and_dtypes():
    upd = {"a": torch.randn(3, 4), "b": torch.randn(5, dtype=torch.float16), "c": torch.randn(2, 2)}
    flat, spec = flatten_update(upd)
    assert flat.dtype == torch.float32 and flat.numel() == 12 + 5 + 4
    back = unflatten_update(flat, spec)
    assert list(back) == ["a", "b", "c"]
    assert back["b"].dtype == torch.float32 and back["a"].shape == (3, 4)
    assert torch.equal(back["a"], upd["a"])


def test_flatten_refuses_integer_tensor_naming_key():
    upd = {"w": torch.randn(3), "bn.num_batches_tracked": torch.tensor(5)}
    with pytest.raises(ValueError, match="bn.num_batches_tracked"):
        flatten_update(upd)


def test_clip_l2_bounds_norm_and_keeps_small():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10_000, generator=g) * 10
    clipped, norm = clip_l2(x, 1.5)
    assert float(torch.linalg.vector_norm(clipped)) <= 1.5 + 1e-5
    assert math.isclose(float(norm), float(x.norm()), rel_tol=1e-5)
    small = x / x.norm() * 0.5
    same, _ = clip_l2(small, 1.5)
    assert torch.allclose(same, small)


def test_clip_l1_bounds_norm():
    x = torch.randn(1000) * 3
    clipped, _ = clip_l1(x, 2.0)
    assert float(clipped.abs().sum()) <= 2.0 + 1e-5


def test_noise_std_and_laplace_scale():
    gen = make_generator("cpu", seed=1)
    n = 200_000
    z = add_gaussian_noise(torch.zeros(n), 0.7, gen)
    assert abs(float(z.std()) - 0.7) < 0.7 * 0.01
    lap = add_laplace_noise(torch.zeros(n), 0.5, gen)
    # Laplace(b): E|X| = b, std = b * sqrt(2)
    assert abs(float(lap.abs().mean()) - 0.5) < 0.5 * 0.01
    assert abs(float(lap.std()) - 0.5 * math.sqrt(2)) < 0.02


def test_unseeded_generators_differ():
    a = torch.randn(10, generator=make_generator("cpu"))
    b = torch.randn(10, generator=make_generator("cpu"))
    assert not torch.equal(a, b)


@pytest.mark.parametrize("numel,frac", [(1_000_003, 0.1), (1000, 0.5), (10, 0.01), (100_000, 0.999), (5, 1.0)])
def test_random_mask_exact_count(numel, frac):
    mask = sparsify_mask(numel, frac, "random", make_generator("cpu", 3))
    assert mask.dtype == torch.bool and (
        int(mask.sum()) == keep_count(numel, frac) == max(1, min(numel, round(frac * numel)))
    )


def test_random_mask_independent_of_update_values():
    n = 50_000
    u1, u2 = torch.randn(n) * 1e6, torch.linspace(-1, 1, n)
    m1 = sparsify_mask(n, 0.2, "random", make_generator("cpu", 42), private_values=u1)
    m2 = sparsify_mask(n, 0.2, "random", make_generator("cpu", 42), private_values=u2)
    assert torch.equal(m1, m2)
    m3 = sparsify_mask(n, 0.2, "random", make_generator("cpu", 43))
    assert not torch.equal(m1, m3)


def test_random_mask_roughly_uniform():
    n, hits = 1000, torch.zeros(1000)
    gen = make_generator("cpu", 7)
    for _ in range(400):
        hits += sparsify_mask(n, 0.25, "random", gen).float()
    # each coordinate kept with probability 0.25: mean 100, sd ~8.7
    assert abs(float(hits.mean()) - 100) < 1e-6
    assert float(hits.min()) > 60 and float(hits.max()) < 140


def test_topk_policies():
    gen = make_generator("cpu", 0)
    scores = torch.tensor([0.1, -5.0, 0.2, 3.0, 0.0])
    m = sparsify_mask(5, 0.4, "topk_public", gen, public_scores=scores)
    assert m.tolist() == [False, True, False, True, False]
    with pytest.raises(ValueError, match="public_scores"):
        sparsify_mask(5, 0.4, "topk_public", gen)
    m = sparsify_mask(5, 0.2, "topk_private", gen, private_values=scores)
    assert m.tolist() == [False, True, False, False, False]
    with pytest.raises(ValueError, match="mask_policy"):
        sparsify_mask(5, 0.2, "bogus", gen)
