"""The SVD merge methods (Iso-C, Iso-CTS, TSV-Merge) against references written
here in float64 numpy from the papers' definitions, called directly and built
end to end; and rotate against a float64 numpy reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from conftest import POSITION_IDS, UNET_IN, as32, invoke, write_recipe
from sdrecipe.methods import get_method
from test_advanced_methods import call, models_near

F64 = np.float64

# --- references --------------------------------------------------------------------------


def polar(matrix):
    """P·Qᵀ of matrix = P·Σ·Qᵀ, on its range."""
    p, s, qh = np.linalg.svd(matrix, full_matrices=False)
    keep = s > max(matrix.shape) * np.finfo(F64).eps * s[0]
    return p[:, keep] @ qh[keep]


def task_matrices(base, tuned):
    """The float64 base and task vectors, as matrices (rows by the rest) when they
    have two dimensions or more."""
    b = base.astype(F64)
    shape = (b.shape[0], -1) if b.ndim >= 2 else b.shape
    return b.reshape(shape), [(t.astype(F64) - b).reshape(shape) for t in tuned]


def zero_tolerance(deltas):
    """Singular values at most this are zero (the implementation's documented rule)."""
    return max(deltas[0].shape) * np.finfo(F64).eps * sum(np.linalg.norm(d) for d in deltas)


def reference_iso_c(base, tuned, alpha=1.0):
    b, deltas = task_matrices(base, tuned)
    if b.ndim < 2:
        return (b + alpha * sum(deltas) / len(deltas)).reshape(base.shape)
    u, s, vh = np.linalg.svd(sum(deltas), full_matrices=False)
    keep = s > zero_tolerance(deltas)
    return (b + alpha * s.mean() * u[:, keep] @ vh[keep]).reshape(base.shape)


def reference_iso_cts(base, tuned, alpha=1.0, common_fraction=0.8):
    b, deltas = task_matrices(base, tuned)
    if b.ndim < 2:
        return (b + alpha * sum(deltas) / len(deltas)).reshape(base.shape)
    rank, count = min(b.shape), len(deltas)
    # The authors' sizes: the task-specific part a multiple of T.
    per_task = min(round((rank - int(rank * common_fraction)) / count), rank // count)
    common = rank - count * per_task
    tolerance = zero_tolerance(deltas)
    u, s, vh = np.linalg.svd(sum(deltas), full_matrices=False)
    keep = s[:common] > tolerance
    lefts, values, rights = [u[:, :common][:, keep]], [s[:common]], [vh[:common][keep]]
    shared = lefts[0]
    for delta in deltas if per_task else []:
        u_t, s_t, vh_t = np.linalg.svd(delta - shared @ (shared.T @ delta), full_matrices=False)
        keep = s_t[:per_task] > tolerance
        lefts.append(u_t[:, :per_task][:, keep])
        values.append(s_t[:per_task])
        rights.append(vh_t[:per_task][keep])
    mean = np.concatenate(values).sum() / rank
    merged = mean * polar(np.hstack(lefts)) @ polar(np.vstack(rights))
    return (b + alpha * merged).reshape(base.shape)


def reference_tsv(base, tuned, alpha=1.0, rank_fraction=0.0):
    b, deltas = task_matrices(base, tuned)
    if b.ndim < 2:
        return (b + alpha * sum(deltas) / len(deltas)).reshape(base.shape)
    rank = min(b.shape)
    k = int(rank * rank_fraction) if rank_fraction else rank // len(deltas)
    if k == 0:
        return b.reshape(base.shape).copy()
    parts = [np.linalg.svd(d, full_matrices=False) for d in deltas]
    u = np.hstack([p[0][:, :k] for p in parts])
    s = np.concatenate([p[1][:k] for p in parts])
    vh = np.vstack([p[2][:k] for p in parts])
    keep = s > zero_tolerance(deltas)
    merged = polar(u[:, keep]) @ np.diag(s[keep]) @ polar(vh[keep])
    return (b + alpha * merged).reshape(base.shape)


REFERENCES = {"iso_c": reference_iso_c, "iso_cts": reference_iso_cts, "tsv": reference_tsv}
SETTINGS = {
    "iso_c": [{}, {"alpha": 0.6}],
    "iso_cts": [{}, {"alpha": 1.3, "common_fraction": 0.5}],
    "tsv": [{}, {"alpha": 0.8, "rank_fraction": 0.25}],
}
CASES = [(method, params) for method, settings in SETTINGS.items() for params in settings]


def near(count: int, shape, seed: int, dtype=np.float16):
    """`models_near`, as arrays even when they hold one number."""
    base, tuned = models_near(count, shape=shape, seed=seed, dtype=dtype)
    return np.asarray(base), [np.asarray(t) for t in tuned]


def relative_error(result, expected, base):
    """max |result - expected| over max |expected - base|: the error in the merged delta."""
    return np.abs(result.astype(F64) - expected).max() / np.abs(expected - base).max()


# --- on random tensors ---------------------------------------------------------------------


@pytest.mark.parametrize(("method", "params"), CASES)
@pytest.mark.parametrize(
    ("shape", "count"), [((40, 30), 3), ((20, 57), 2), ((12, 5, 3, 3), 3), ((30,), 2), ((), 3)]
)
def test_methods_match_numpy_on_random_tensors(method, params, shape, count):
    base, tuned = near(count, shape, seed=count + len(shape))
    result = call(method, base, *tuned, **params)
    expected = REFERENCES[method](as32(base), [as32(t) for t in tuned], **params)
    assert result.dtype == np.float32 and result.shape == base.shape
    np.testing.assert_allclose(result, expected, rtol=1e-6, atol=1e-7)
    if len(shape) >= 2:
        assert relative_error(result, expected, as32(base).astype(F64)) < 1e-5


def test_the_methods_differ_from_task_arithmetic_and_each_other():
    """The references are not all one formula: on correlated task vectors the
    methods move the base differently."""
    base, tuned = models_near(3, shape=(40, 30), seed=9)
    shared = as32(tuned[0]) - as32(base)
    tuned = [(as32(t) + 2 * shared).astype(np.float16) for t in tuned]
    results = {m: call(m, base, *tuned) for m in REFERENCES}
    arithmetic = as32(base) + sum(as32(t) - as32(base) for t in tuned)
    for name, result in results.items():
        assert np.abs(result - arithmetic).max() > 1e-2, name
    assert np.abs(results["iso_c"] - results["iso_cts"]).max() > 1e-3
    assert np.abs(results["iso_c"] - results["tsv"]).max() > 1e-3


def test_iso_c_flattens_the_spectrum():
    base, tuned = models_near(2, shape=(30, 20), seed=3, dtype=np.float32)
    merged = call("iso_c", base, *tuned) - base
    singular = np.linalg.svd(merged.astype(F64), compute_uv=False)
    total = np.linalg.svd(sum(t.astype(F64) - base for t in tuned), compute_uv=False)
    np.testing.assert_allclose(singular, total.mean(), rtol=1e-5)


def test_tsv_of_one_model_is_its_task_vector():
    base, (tuned,) = models_near(1, shape=(25, 40), seed=4, dtype=np.float32)
    for method in ("tsv", "iso_cts"):
        params = {"common_fraction": 0.0} if method == "iso_cts" else {}
        result = call(method, base, tuned, **params)
        if method == "tsv":
            np.testing.assert_allclose(result, tuned, rtol=1e-6, atol=1e-6)
        else:
            # One task, no common part: its own directions, the spectrum flattened.
            np.testing.assert_allclose(result, call("iso_c", base, tuned), rtol=1e-6, atol=1e-6)


# --- edge cases ----------------------------------------------------------------------------


@pytest.mark.parametrize("method", sorted(REFERENCES))
@pytest.mark.parametrize("shape", [(1, 40), (40, 1), (1, 1), (7, 2, 1, 1), (3,), ()])
def test_zero_task_vectors_give_the_base(method, shape):
    base, _ = near(0, shape, seed=2)
    result = call(method, base, base.copy(), base.copy())
    np.testing.assert_array_equal(result, as32(base))


@pytest.mark.parametrize(("method", "params"), CASES)
@pytest.mark.parametrize("shape", [(1, 40), (40, 1), (1, 1), (3, 2)])
@pytest.mark.parametrize("count", [1, 2, 3])
def test_matrices_of_rank_one_and_few_tasks(method, params, shape, count):
    base, tuned = models_near(count, shape=shape, seed=count)
    result = call(method, base, *tuned, **params)
    expected = REFERENCES[method](as32(base), [as32(t) for t in tuned], **params)
    assert np.isfinite(result).all()
    np.testing.assert_allclose(result, expected, rtol=1e-6, atol=1e-7)
    if method == "iso_c" and min(shape) == 1:
        # Rank one: the spectrum is flat already; Iso-C is task arithmetic.
        arithmetic = as32(base) + params.get("alpha", 1.0) * sum(
            as32(t) - as32(base) for t in tuned
        )
        np.testing.assert_allclose(result, arithmetic, rtol=1e-6, atol=1e-6)


def test_tsv_keeps_nothing_from_a_matrix_of_rank_below_the_task_count():
    base, tuned = models_near(3, shape=(2, 30), seed=6)
    np.testing.assert_array_equal(call("tsv", base, *tuned), as32(base))
    # rank_fraction: each task keeps ⌊0.5·2⌋ = 1 triplet.
    assert not np.array_equal(call("tsv", base, *tuned, rank_fraction=0.5), as32(base))


def test_tsv_with_more_triplets_than_the_rank():
    """rank_fraction above 1/T: the concatenated bases have more columns than
    rows, and their polar factors orthonormal rows instead of columns."""
    base, tuned = near(3, (12, 20), seed=5)
    for fraction in (0.6, 1.0):
        result = call("tsv", base, *tuned, rank_fraction=fraction)
        expected = reference_tsv(as32(base), [as32(t) for t in tuned], rank_fraction=fraction)
        np.testing.assert_allclose(result, expected, rtol=1e-6, atol=1e-7)


def test_undetermined_directions_are_left_out():
    """Rank-deficient task vectors: the directions of zero singular value are
    LAPACK's arbitrary ones; the result must not depend on them."""
    rng = np.random.default_rng(7)
    base = rng.standard_normal((30, 20))
    low_rank = rng.standard_normal((30, 2)) @ rng.standard_normal((2, 20)) * 0.1
    tuned = [base + low_rank, base + 0.5 * low_rank]
    # Iso-C: rank 2, s̄ over all 20 singular values, on the two directions only.
    merged = call("iso_c", base, *tuned).astype(F64) - base
    u, s, vh = np.linalg.svd(1.5 * low_rank)
    np.testing.assert_allclose(merged, s.mean() * u[:, :2] @ vh[:2], atol=1e-6)
    # TSV of two identical models: their task vector (the shared basis counted once).
    same = call("tsv", base, base + low_rank, base + low_rank, rank_fraction=1.0)
    np.testing.assert_allclose(same, base + low_rank, atol=1e-6)
    # numpy's LAPACK picks other arbitrary vectors than torch's: the two agree
    # only if neither result depends on them.
    for method, params in CASES:
        result = call(method, base, *tuned, **params)
        expected = REFERENCES[method](base, tuned, **params)
        np.testing.assert_allclose(result, expected, atol=1e-6, err_msg=method)


def test_float64_operands_give_float64_results_and_stay_as_they_are():
    base, tuned = models_near(2, shape=(20, 30), seed=8, dtype=np.float64)
    before = [base.copy(), *(t.copy() for t in tuned)]
    for method in REFERENCES:
        spec = get_method(method)
        values = spec.validate({})
        out = spec.function(
            torch.from_numpy(base), *map(torch.from_numpy, tuned), dtype=torch.float64, **values
        )
        assert out.dtype == torch.float64
        np.testing.assert_allclose(out.numpy(), REFERENCES[method](base, tuned), rtol=1e-12)
        for operand, original in zip([base, *tuned], before, strict=True):
            np.testing.assert_array_equal(operand, original)


@pytest.mark.parametrize("method", sorted(REFERENCES))
def test_methods_never_modify_their_operands(method):
    for shape in ((40, 30), (6, 4, 3, 3), (30,)):
        base, tuned = near(2, shape, seed=0, dtype=np.float32)
        operands = [base, *tuned]
        before = [o.copy() for o in operands]
        call(method, *operands)
        for operand, original in zip(operands, before, strict=True):
            np.testing.assert_array_equal(operand, original)


def test_parameters_are_checked():
    with pytest.raises(ValueError, match="common_fraction"):
        get_method("iso_cts").validate({"common_fraction": 1.5})
    with pytest.raises(ValueError, match="rank_fraction"):
        get_method("tsv").validate({"rank_fraction": -0.1})
    assert get_method("tsv").signature == "tsv(base, *models, alpha=1.0, rank_fraction=0.0)"


# --- from recipes ------------------------------------------------------------------------

# Per-key values: two settings of each method in one build.
NODES = {
    "iso_c": "iso_c(C, A, B, alpha={default: 1.0, vae: 0.6})",
    "iso_cts": "iso_cts(C, A, B, common_fraction={default: 0.8, text_encoder: 0.5})",
    "tsv": "tsv(C, A, B, alpha=0.9, rank_fraction={default: 0.0, vae: 0.25})",
}


def params_at(method: str, key: str) -> dict[str, float]:
    """NODES[method]'s parameters at `key`."""
    component = (
        "text_encoder"
        if key.startswith("cond_stage_model.")
        else "vae"
        if key.startswith("first_stage_model.")
        else "unet"
    )
    if method == "iso_c":
        return {"alpha": 0.6 if component == "vae" else 1.0}
    if method == "iso_cts":
        return {"common_fraction": 0.5 if component == "text_encoder" else 0.8}
    return {"alpha": 0.9, "rank_fraction": 0.25 if component == "vae" else 0.0}


def build(folder, models, inputs, threads: int):
    """Build every NODES method over the fixture models `inputs` as A, B, C (float32)."""
    a, b, c = (models[name] for name in inputs)
    folder.mkdir(exist_ok=True)
    nodes = "".join(f'  {m}: "{node}"\n' for m, node in NODES.items())
    outputs = "".join(f"  {m}: {{path: {m}.safetensors, dtype: float32}}\n" for m in NODES)
    recipe = write_recipe(
        folder, f"inputs: {{A: {a}, B: {b}, C: {c}}}\nnodes:\n{nodes}outputs:\n{outputs}"
    )
    result = invoke("build", str(recipe), "-j", str(threads), "--no-cache")
    assert result.exit_code == 0, result.output
    return {m: folder / f"{m}.safetensors" for m in NODES}


def test_builds_match_numpy_on_every_key_and_at_any_thread_count(tmp_path, models, arrays):
    one = build(tmp_path / "one", models, ("finetune", "other", "base"), threads=1)
    two = build(tmp_path / "two", models, ("finetune", "other", "base"), threads=2)
    a, b, c = (arrays[n] for n in ("finetune", "other", "base"))
    for method, path in one.items():
        assert path.read_bytes() == two[method].read_bytes(), method
        out = load_file(path)
        np.testing.assert_array_equal(out[POSITION_IDS], a[POSITION_IDS])
        matrices = 0
        for key in a:
            if key == POSITION_IDS:
                continue
            expected = REFERENCES[method](
                as32(c[key]), [as32(a[key]), as32(b[key])], **params_at(method, key)
            )
            np.testing.assert_allclose(out[key], expected, rtol=2e-6, atol=2e-7, err_msg=key)
            matrices += a[key].ndim >= 2
        assert matrices > 400


def test_methods_follow_the_inpainting_channel_rule(tmp_path, models, arrays):
    # The inpainting model is the base, C.
    outputs = build(tmp_path, models, ("finetune", "other", "inpainting"), threads=2)
    c = as32(arrays["inpainting"][UNET_IN])
    a, b = (as32(arrays[n][UNET_IN]) for n in ("finetune", "other"))
    for method, path in outputs.items():
        out = load_file(path)[UNET_IN]
        assert out.shape == c.shape
        np.testing.assert_array_equal(out[:, 4:], c[:, 4:])
        # The shared channels: the method on the base's first four input channels.
        expected = REFERENCES[method](c[:, :4], [a, b], **params_at(method, UNET_IN))
        np.testing.assert_allclose(out[:, :4], expected, rtol=2e-6, atol=2e-7, err_msg=method)


# --- rotate in float64 -------------------------------------------------------------------


def expm_skew(a):
    """exp of a real skew-symmetric matrix, by the eigenvectors of the Hermitian i·a."""
    w, z = np.linalg.eigh(1j * a)
    return ((z * np.exp(-1j * w)) @ z.conj().T).real


def logm_orthogonal(v):
    """The principal logarithm of an orthogonal matrix with no eigenvalue -1."""
    w, z = np.linalg.eig(v)
    return np.linalg.solve(z.T, (z * np.log(w)).T).T.real


def stiefel_log(start, end, tol=1e-13, max_iter=2000):
    """Zimmermann's algorithm (2017), its plain form: Δ at `start` with Exp(Δ) = `end`."""
    p = start.shape[1]
    m = start.T @ end
    q, n = np.linalg.qr(end - start @ m)
    stacked = np.vstack([m, n])
    completion = np.linalg.qr(stacked, mode="complete")[0][:, p:]
    v = np.hstack([stacked, completion])
    if np.linalg.det(v) < 0:
        v[:, -1] *= -1
    for _ in range(max_iter):
        log = logm_orthogonal(v)
        if np.linalg.norm(log[p:, p:]) < tol:
            break
        v[:, p:] = v[:, p:] @ expm_skew(-log[p:, p:])
    return start @ log[:p, :p] + q @ log[p:, :p]


def stiefel_exp(start, tangent):
    """The canonical-metric geodesic from `start` along `tangent`, at time 1 (Edelman et al.)."""
    p = start.shape[1]
    a = start.T @ tangent
    q, r = np.linalg.qr(tangent - start @ a)
    moved = expm_skew(np.block([[a, -r.T], [r, np.zeros((p, p))]]))
    return start @ moved[:p, :p] + q @ moved[p:, :p]


def reference_rotate64(a, b, alignment, alpha):
    """sd-mecha's rotate in float64 numpy, centralization 1; for fewer rows than
    columns, the undetermined frame pair as its limit as centralization → 1."""
    conv = a.ndim == 4 and a.shape[2] * a.shape[3] != 1
    shape = (a.shape[0] * a.shape[1], -1) if conv else (a.shape[0], -1)
    a64, b64 = a.astype(F64).reshape(shape), b.astype(F64).reshape(shape)
    rows, columns = a64.shape
    mean_a, mean_b = a64.mean(0), b64.mean(0)
    ca, cb = a64 - mean_a, b64 - mean_b
    if rows >= columns:
        u, _, vh = np.linalg.svd(ca.T @ cb)
        if alignment != round(alignment):
            u[:, -1] *= np.sign(np.linalg.det(u @ vh))
        w, z = np.linalg.eig(u @ vh)
        power = np.linalg.solve(z.T, (z * w**alignment).T).T.real
        moved = ((1 - alpha) * ca + alpha * cb @ (u @ vh).T) @ power
    else:
        frame = np.linalg.qr(b64.T)[0]
        u, _, vh = np.linalg.svd(ca.T @ cb @ frame, full_matrices=False)
        rest = mean_a - u[:, :-1] @ (u[:, :-1].T @ mean_a)
        u[:, -1] = rest / np.linalg.norm(rest)
        vh[-1] *= np.sign(vh[-1] @ frame.T @ mean_b)
        v = frame @ vh.T

        def transform(x, t):
            if t in (1.0, -1.0):
                start, end = (v, u) if t == 1.0 else (u, v)
            else:
                log = stiefel_log(v, u)
                start, end = stiefel_exp(v, log * (1 - t) / 2), stiefel_exp(v, log * (1 + t) / 2)
            return x - x @ start @ start.T + x @ end @ start.T

        moved = transform((1 - alpha) * ca + alpha * transform(cb, -1.0), alignment)
    return (moved + (1 - alignment) * mean_a + alignment * mean_b).reshape(a.shape)


@pytest.mark.parametrize(("alignment", "alpha"), [(0.5, 0.0), (0.3, 0.0), (0.3, 0.5), (1.0, 0.4)])
@pytest.mark.parametrize("shape", [(8, 200), (16, 64, 1, 1), (64, 24), (8, 4, 3, 3)])
def test_rotate_in_float32_matches_a_float64_reference(shape, alignment, alpha):
    """Fewer rows than columns used to be up to 4% off in float32 (the centred
    rows sum to 0: one frame pair was rounding noise), more rows 1e-4 off at
    fractional alignments (the power in float32)."""
    _, (a, b) = models_near(2, shape=shape, seed=11, spread=1.0, dtype=np.float32)
    result = call("rotate", a, b, alignment=alignment, alpha=alpha)
    expected = reference_rotate64(a, b, alignment, alpha)
    assert np.linalg.norm(result - expected) <= 1e-5 * np.linalg.norm(expected)
    np.testing.assert_allclose(result, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_rotate_is_continuous_in_centralization():
    """At centralization 1 the wide form takes the limit: nearby values differ
    by about their distance to 1."""
    _, (a, b) = models_near(2, shape=(10, 48), seed=12, spread=1.0, dtype=np.float32)
    at_one = call("rotate", a, b, alignment=0.5, centralization=1.0)
    for h in (1e-2, 1e-3, 1e-5):
        near = call("rotate", a, b, alignment=0.5, centralization=1.0 - h)
        assert np.abs(near - at_one).max() < 10 * h + 1e-5, h
