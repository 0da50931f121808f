"""The merge methods against the established implementations: PEFT, mergekit,
sd-mecha and sd-meh (the `oracles` extra; never a dependency of sdrecipe)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from test_advanced_methods import call, dare_masks, models_near

merge_utils = pytest.importorskip("peft.utils.merge_utils")
mergekit_slerp = pytest.importorskip("mergekit.merge_methods.slerp")
mecha = pytest.importorskip("sd_mecha.extensions.builtin.merge_methods")
meh = pytest.importorskip("sd_meh.merge_methods")


def tensors(*arrays: np.ndarray) -> list[torch.Tensor]:
    return [torch.from_numpy(a.astype(np.float32)) for a in arrays]


@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
def test_ties_sum_rule_equals_peft(density):
    # float32: float16 differences tie in magnitude, and PEFT keeps an arbitrary
    # int(density·n) of the tied entries where sdrecipe keeps them all.
    base, tuned = models_near(4, shape=(120, 90), seed=2, dtype=np.float32)
    base_t, *tuned_t = tensors(base, *tuned)
    deltas = [t - base_t for t in tuned_t]
    weights = torch.full((4,), 0.8)
    with pytest.warns(UserWarning) if density >= 1 else _nothing():
        expected = base_t + merge_utils.ties(deltas, weights, density, "total")
    result = call("ties", base, *tuned, density=density, alpha=0.8)
    np.testing.assert_allclose(result, expected.numpy(), rtol=1e-6, atol=1e-6)


def test_ties_count_rule_equals_sd_mecha_on_trimmed_deltas():
    """sd-mecha counts signs (and elects nothing on a tie); its own trim keeps one
    element more than int(density·n), so it is given deltas trimmed as sdrecipe trims."""
    base, tuned = models_near(2, shape=(64, 64), seed=3, dtype=np.float32)
    result = call("ties", base, *tuned, density=0.4, sign="count")
    base_t, *tuned_t = tensors(base, *tuned)
    trimmed = [merge_utils.magnitude_based_pruning(t - base_t, 0.4) for t in tuned_t]
    expected = base_t + mecha.ties.ties_sum.__wrapped__(*trimmed, k=1.0, vote_sgn=False)
    np.testing.assert_allclose(result, expected.numpy(), rtol=1e-6, atol=1e-6)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def injected_bernoulli(monkeypatch, masks: list[np.ndarray]):
    """Make torch.bernoulli return sdrecipe's masks, in order: PEFT then drops
    exactly the entries sdrecipe drops."""
    queue = [torch.from_numpy(m.astype(np.float32)) for m in masks]

    def bernoulli(probabilities, *args, **kwargs):
        return queue.pop(0).reshape(probabilities.shape)

    monkeypatch.setattr(torch, "bernoulli", bernoulli)


@pytest.mark.parametrize("method", ["dare", "dare_ties"])
def test_dare_equals_peft_with_the_same_masks(monkeypatch, method):
    base, tuned = models_near(3, shape=(80, 50), seed=6)
    result = call(method, base, *tuned, drop=0.7, alpha=1.0, seed=9, key="unet.k")
    injected_bernoulli(monkeypatch, dare_masks("unet.k", 9, 0.7, 3, base.size))
    base_t, *tuned_t = tensors(base, *tuned)
    deltas = [t - base_t for t in tuned_t]
    if method == "dare":
        # PEFT sums weighted task vectors; sdrecipe averages them: weights 1/3.
        merged = merge_utils.dare_linear(deltas, torch.full((3,), 1 / 3), density=0.3)
    else:
        merged = merge_utils.dare_ties(deltas, torch.ones(3), density=0.3)
    np.testing.assert_allclose(result, (base_t + merged).numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("t", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("per_row", [False, True])
def test_slerp_equals_mergekit(t, per_row):
    _, (a, b) = models_near(2, shape=(48, 3, 3, 3), seed=4, spread=1.0)
    a_t, b_t = tensors(a, b)
    if per_row:
        expected = mergekit_slerp.slerp(torch.tensor(t), a_t, b_t)
    else:
        # mergekit 0.1.5 interpolates each row; one row is the classic whole-tensor SLERP.
        expected = mergekit_slerp.slerp(torch.tensor(t), a_t.reshape(1, -1), b_t.reshape(1, -1))
    result = call("slerp", a, b, t=t, per_row=per_row)
    np.testing.assert_allclose(result, expected.reshape(a.shape).numpy(), rtol=1e-5, atol=1e-6)


def test_geometric_median_equals_sd_mecha():
    _, points = models_near(4, shape=(40, 30), seed=8, spread=1.0)
    expected = mecha.ties.geometric_median.__wrapped__(
        *tensors(*points), eps=1e-6, maxiter=30, ftol=1e-20
    )
    result = call("geometric_median", *points, max_iter=30)
    np.testing.assert_allclose(result, expected.numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("shape", "alignment", "alpha", "centralization"),
    [
        ((60, 20), 1.0, 0.0, 1.0),
        ((60, 20), 1.0, 0.4, 1.0),
        ((60, 20), 0.5, 0.0, 1.0),
        ((60, 20), 0.3, 0.5, 1.0),
        ((12, 40), 1.0, 0.0, 1.0),
        ((12, 40), 1.0, 0.5, 1.0),
        ((12, 40), 0.5, 0.0, 1.0),
        ((12, 40), 0.3, 0.5, 0.7),
        ((8, 4, 3, 3), 1.0, 0.2, 1.0),
    ],
)
def test_rotate_equals_sd_mecha(shape, alignment, alpha, centralization, caplog):
    """For fewer rows than columns at centralization 1, sd-mecha's own result is
    undetermined (the centred rows sum to 0, and one pair of its Procrustes frames
    is whatever rounding gives: 1e-13 changes to A and B move it by percents).
    sdrecipe takes the limit as centralization → 1; the comparison is with the
    limit of sd-mecha's results, 2·R(1 - h) - R(1 - 2h), which is within 1e-7 of it."""
    rng = np.random.default_rng(5)
    a = rng.standard_normal(shape)
    # B near a rotation of A, as fine-tunes are: the Stiefel logarithm converges.
    b = a + 0.3 * rng.standard_normal(shape)
    a64, b64 = torch.from_numpy(a), torch.from_numpy(b)

    def sd_mecha(centred: float) -> np.ndarray:
        return mecha.svd.rotate.__wrapped__(
            {"k": a64},
            {"k": b64},
            alignment=alignment,
            alpha=torch.tensor(alpha, dtype=torch.float64),
            centralization=centred,
            stiefel_eps=1e-12,
            stiefel_max_iters=200,
            key="k",
        ).numpy()

    with caplog.at_level(logging.ERROR):
        # Convolutions are rotated as (out·in, kernel): tall.
        if len(shape) == 2 and shape[0] < shape[1] and centralization == 1.0:
            expected = 2 * sd_mecha(1 - 1e-3) - sd_mecha(1 - 2e-3)
        else:
            expected = sd_mecha(centralization)
    spec = mecha_free_call(
        "rotate", a64, b64, alignment=alignment, alpha=alpha, centralization=centralization
    )
    np.testing.assert_allclose(spec, expected, rtol=1e-5, atol=1e-6)


def mecha_free_call(method: str, *operands: torch.Tensor, **params) -> np.ndarray:
    """sdrecipe's method on float64 tensors (rotate compares best in float64)."""
    from sdrecipe.methods import get_method

    spec = get_method(method)
    return spec.function(*operands, **spec.validate(params)).numpy()


def test_train_difference_equals_sd_mecha():
    base, (a, b) = models_near(2, seed=7)
    a_t, b_t, c_t = tensors(a, b, base)
    mask = mecha.linear.train_difference_mask.__wrapped__(a_t, b_t, c_t, alpha=torch.tensor(0.6))
    expected = a_t + (b_t - c_t) * mask
    result = call("train_difference", a, b, base, alpha=0.6)
    np.testing.assert_allclose(result, expected.numpy(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "method", ["triple_sum", "sum_twice", "multiply_difference", "similarity_add_difference"]
)
def test_three_model_methods_equal_sd_meh(method):
    base, (a, b) = models_near(2, seed=9)
    a_t, b_t, c_t = tensors(a, b, base)
    expected = getattr(meh, method)(a_t, b_t, c_t, alpha=0.35, beta=0.55)
    result = call(method, a, b, base, alpha=0.35, beta=0.55)
    np.testing.assert_allclose(result, expected.numpy(), rtol=1e-5, atol=1e-6)


def test_the_oracles_are_not_sdrecipe_dependencies():
    import importlib.metadata

    requirements = importlib.metadata.requires("sdrecipe") or []
    runtime = [r for r in requirements if "extra ==" not in r]
    for oracle in ("peft", "mergekit", "sd-mecha", "sd-meh"):
        assert not any(r.startswith(oracle) for r in runtime), oracle
