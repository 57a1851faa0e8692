"""Evaluation: the shipped MNIST classifier, the Fréchet distance, FID with intervals, the floor."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from ditkit.data.mnist import load_mnist, mnist_cache_path
from ditkit.errors import DitkitError
from ditkit.eval import classifier as C
from ditkit.eval import fid as F
from ditkit.eval import metrics as M

# ---------------------------------------------------------------------------------------------
# Fixtures: real MNIST once per session; reference statistics in a private cache folder that
# reads MNIST from the shared one (a symlink), so the tests never download twice.
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One intra-op thread for this module: on a shared 2-core machine, two OpenMP threads that
    spin-wait for each other run these small batches ~4× slower than one (measured)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def mnist_test() -> tuple[np.ndarray, np.ndarray]:
    return load_mnist("test")


@pytest.fixture(scope="session")
def mnist_train() -> tuple[np.ndarray, np.ndarray]:
    return load_mnist("train")


@pytest.fixture(scope="session")
def cache(tmp_path_factory, mnist_test, mnist_train):
    root = tmp_path_factory.mktemp("ditkit-cache")
    (root / "mnist").symlink_to(mnist_cache_path().parent, target_is_directory=True)
    return root


@pytest.fixture(scope="session")
def model() -> C.MnistClassifier:
    return C.load_classifier()


@pytest.fixture(scope="session")
def ref(cache, model):
    return F.reference_stats("test", cache_dir=cache, model=model)


@pytest.fixture(scope="session")
def held_out(mnist_train):
    """1000 real training digits: never part of the test-set reference."""
    x, y = mnist_train
    index = np.random.default_rng(123).choice(len(x), size=1000, replace=False)
    return x[index], y[index]


# ---------------------------------------------------------------------------------------------
# Classifier.
# ---------------------------------------------------------------------------------------------


def test_shipped_weights_hash_matches_and_load():
    data = C.WEIGHTS_PATH.read_bytes()
    assert hashlib.sha256(data).hexdigest() == C.CLASSIFIER_SHA256
    assert len(data) < 600_000  # a few hundred KB
    m = C.load_classifier()
    assert m.sha256 == C.CLASSIFIER_SHA256 and not m.training
    assert C.weights_sha256(m) == C.CLASSIFIER_SHA256


def test_tampered_or_foreign_weights_are_refused(tmp_path):
    data = bytearray(C.WEIGHTS_PATH.read_bytes())
    data[-1] ^= 0xFF
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(DitkitError, match="sha256"):
        C.load_classifier(bad, sha256=C.CLASSIFIER_SHA256)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x80\x04not safetensors at all")
    with pytest.raises(DitkitError, match="safetensors"):
        C.load_classifier(junk)
    with pytest.raises(DitkitError, match="unreadable"):
        C.load_classifier(tmp_path / "missing.safetensors")


def test_accuracy_on_full_test_set(mnist_test, model):
    x, y = mnist_test
    pred = C.classify(x, model)
    assert pred.dtype == np.int64 and pred.shape == (10000,)
    assert (pred == y).mean() >= 0.993


def test_input_layouts_agree(mnist_test, model):
    x = mnist_test[0][:64]
    base = C.features(x, model)
    assert base.shape == (64, C.FEATURE_DIM) and base.dtype == np.float64
    for variant in (x[:, None], x[..., None], x.astype(np.float32) / 255.0, torch.from_numpy(x)):
        np.testing.assert_allclose(C.features(variant, model, batch_size=7), base, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(C.labels_from_features(base, model), C.classify(x, model))


def test_train_classifier_is_deterministic(tmp_path):
    rng_before = torch.get_rng_state()
    kwargs = dict(epochs=1, seed=0, progress=False, n_train=2000, n_test=500)
    m1, acc1 = C.train_classifier(out=tmp_path / "w.safetensors", **kwargs)
    m2, acc2 = C.train_classifier(**kwargs)
    assert acc1 == acc2 and acc1 > 0.5
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert s1.keys() == s2.keys()
    for k in s1:
        assert torch.equal(s1[k], s2[k]), k
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's RNG is left alone
    loaded = C.load_classifier(tmp_path / "w.safetensors", sha256=m1.sha256)
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, s1[k]), k


# ---------------------------------------------------------------------------------------------
# Fréchet distance.
# ---------------------------------------------------------------------------------------------


def test_frechet_identical_is_zero():
    rng = np.random.default_rng(0)
    mu, sigma = F.feature_stats(rng.normal(size=(500, 16)))
    assert abs(F.frechet_distance(mu, sigma, mu, sigma)) < 1e-8


def test_frechet_closed_forms():
    # 1-D: (m1 - m2)² + (s1 - s2)² with s the standard deviations.
    assert F.frechet_distance([1.0], [[4.0]], [-2.0], [[9.0]]) == pytest.approx(9.0 + 1.0, abs=1e-9)
    # Diagonal: the sum of the per-dimension 1-D distances.
    rng = np.random.default_rng(1)
    m1, m2 = rng.normal(size=8), rng.normal(size=8)
    v1, v2 = rng.uniform(0.1, 3, size=8), rng.uniform(0.1, 3, size=8)
    expected = np.sum((m1 - m2) ** 2 + (np.sqrt(v1) - np.sqrt(v2)) ** 2)
    assert F.frechet_distance(m1, np.diag(v1), m2, np.diag(v2)) == pytest.approx(expected, rel=1e-9)
    # Full covariances: tr sqrt(S1 S2) = sum of sqrt of the (real, >= 0) eigenvalues of S1 S2.
    a, b = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    s1, s2 = a @ a.T + 0.1 * np.eye(6), b @ b.T + 0.1 * np.eye(6)
    tr_sqrt = np.sqrt(np.linalg.eigvals(s1 @ s2).real).sum()
    expected = np.sum((m1[:6] - m2[:6]) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert F.frechet_distance(m1[:6], s1, m2[:6], s2) == pytest.approx(expected, rel=1e-8)
    assert F.frechet_distance(m2[:6], s2, m1[:6], s1) == pytest.approx(expected, rel=1e-8)


def test_frechet_imaginary_part_check(monkeypatch):
    # Not a covariance (a negative variance): sqrtm is genuinely complex → refused.
    with pytest.raises(F.FrechetDistanceError, match="imaginary"):
        F.frechet_distance(np.zeros(2), np.diag([-1.0, 1.0]), np.zeros(2), np.eye(2))
    # Rank-deficient covariances (3 samples in 10-D) still give a finite, real distance.
    rng = np.random.default_rng(2)
    d = F.frechet_distance(*F.feature_stats(rng.normal(size=(3, 10))), *F.feature_stats(rng.normal(size=(4, 10))))
    assert np.isfinite(d) and isinstance(d, float)
    # Rounding-noise imaginary parts (below 1e-3) are dropped; larger ones survive the eps retry → error.
    real_sqrtm = F.linalg.sqrtm
    monkeypatch.setattr(F.linalg, "sqrtm", lambda a: real_sqrtm(a) + 1e-6j)
    assert F.frechet_distance([0.0], [[4.0]], [0.0], [[1.0]]) == pytest.approx(1.0, abs=1e-9)
    monkeypatch.setattr(F.linalg, "sqrtm", lambda a: real_sqrtm(a) + 1e-2j)
    with pytest.raises(F.FrechetDistanceError):
        F.frechet_distance([0.0], [[4.0]], [0.0], [[1.0]])


def test_distance_to_a_fixed_reference_is_the_frechet_distance():
    """The bootstrap's fast form (a symmetric eigendecomposition) equals the general sqrtm form: full-rank
    covariances, a rank-deficient sample (fewer samples than dimensions, as at small n), and a reference
    that is itself singular; and it refuses what frechet_distance refuses."""
    rng = np.random.default_rng(5)
    ref = F.feature_stats(rng.normal(size=(400, 32)) @ rng.normal(size=(32, 32)))
    to_ref = F.DistanceToReference(*ref)
    for n in (300, 20, 3):
        stats = F.feature_stats(rng.normal(0.3, 2.0, size=(n, 32)))
        assert to_ref(*stats) == pytest.approx(F.frechet_distance(*stats, *ref), rel=1e-8), n
    singular = F.feature_stats(rng.normal(size=(5, 32)))
    stats = F.feature_stats(rng.normal(size=(300, 32)))
    assert F.DistanceToReference(*singular)(*stats) == pytest.approx(F.frechet_distance(*stats, *singular), rel=1e-6)
    assert to_ref(*ref) == pytest.approx(0.0, abs=1e-8)
    assert F.DistanceToReference([1.0], [[4.0]])([-2.0], [[9.0]]) == pytest.approx(10.0, abs=1e-9)
    with pytest.raises(DitkitError, match="expected mu"):
        to_ref(np.zeros(3), np.eye(3))
    with pytest.raises(DitkitError, match="finite"):
        F.DistanceToReference([np.nan], [[1.0]])


def test_frechet_bad_shapes():
    with pytest.raises(DitkitError, match="expected mu"):
        F.frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))
    with pytest.raises(DitkitError, match="NaN"):
        F.frechet_distance([np.nan], [[1.0]], [0.0], [[1.0]])
    with pytest.raises(DitkitError, match="N >= 2"):
        F.feature_stats(np.zeros((1, 4)))


# ---------------------------------------------------------------------------------------------
# FID on real data, noise and blanks; the reference cache.
# ---------------------------------------------------------------------------------------------


def test_reference_stats_cached_and_keyed_by_hash(cache, model, ref):
    mu, sigma = ref
    assert mu.shape == (C.FEATURE_DIM,) and sigma.shape == (C.FEATURE_DIM, C.FEATURE_DIM)
    path = F.reference_stats_path("test", model.sha256, cache)
    assert path.exists() and C.CLASSIFIER_SHA256[:16] in path.name
    with np.load(path) as z:
        assert str(z["classifier_sha256"]) == model.sha256 and int(z["n"]) == 10000
        np.testing.assert_array_equal(z["mu"], mu)


def test_reference_stats_recomputed_when_hash_differs(tmp_path, monkeypatch, mnist_test, model):
    # A private cache whose "MNIST" is 300 test digits, so the recomputation is cheap and visible.
    x, y = mnist_test[0][:300], mnist_test[1][:300]
    monkeypatch.setattr(F, "load_mnist", lambda split, cache_dir=None: (x, y))
    path = F.reference_stats_path("test", model.sha256, tmp_path)
    path.parent.mkdir(parents=True)
    np.savez(path, mu=np.zeros(C.FEATURE_DIM), sigma=np.eye(C.FEATURE_DIM),
             classifier_sha256=np.array("0" * 64), n=np.array(300))
    try:
        mu, sigma = F.reference_stats("test", cache_dir=tmp_path, model=model)
    finally:
        F.clear_reference_memo()
    exp_mu, exp_sigma = F.feature_stats(C.features(x, model))
    np.testing.assert_allclose(mu, exp_mu, rtol=1e-12)
    np.testing.assert_allclose(sigma, exp_sigma, rtol=1e-12)
    with np.load(path) as z:  # rewritten under the right hash
        assert str(z["classifier_sha256"]) == model.sha256
        np.testing.assert_array_equal(z["mu"], mu)
    with pytest.raises(DitkitError, match="split"):
        F.reference_stats("valid", cache_dir=tmp_path, model=model)


def test_fid_real_small_noise_and_blank_large(cache, model, ref, held_out):
    real = F.fid_from_images(held_out[0], model=model, cache_dir=cache)
    rng = np.random.default_rng(0)
    noise = F.fid_from_images(rng.integers(0, 256, size=(500, 28, 28), dtype=np.uint8), model=model, cache_dir=cache)
    blank = F.fid_from_images(np.zeros((500, 28, 28), np.uint8), model=model, cache_dir=cache)
    assert 0 <= real < 0.05 * noise
    assert real < 0.05 * blank
    # Real digits at the same n sit near the floor (the mean FID of 5 disjoint sets of 1000 real digits).
    floor = M.real_data_floor(1000, model=model, cache_dir=cache)
    assert floor["n"] == 1000 and floor["split"] == "train" and len(floor["values"]) == M.FLOOR_DRAWS
    assert floor["value"] == pytest.approx(np.mean(floor["values"]))
    assert real < 1.5 * floor["value"] and floor["value"] < 0.05 * blank
    # ... cached on disk under the classifier hash: a new process reads it instead of recomputing.
    path = M.real_data_floor_path(1000, 0, M.FLOOR_DRAWS, model.sha256, cache)
    assert M._read_floor(path, model.sha256, 1000, M.FLOOR_DRAWS) == floor


def test_bootstrap_ci_contains_estimate():
    values = np.random.default_rng(0).normal(3.0, 1.0, size=400)
    ci = M.bootstrap_ci(values, n_boot=500, seed=0)
    assert ci["value"] == pytest.approx(values.mean()) and ci["n"] == 400
    assert ci["ci_low"] < ci["value"] < ci["ci_high"]
    assert ci == M.bootstrap_ci(values, n_boot=500, seed=0)  # seeded
    with pytest.raises(DitkitError, match="pass n"):
        M.bootstrap_ci(lambda idx: 0.0)


def test_fid_with_ci_and_evaluate_images(cache, model, ref, held_out):
    x, y = held_out
    fid = M.fid_with_ci(x, n_boot=50, model=model, cache_dir=cache)
    assert fid["n"] == 1000 and fid["ci_low"] < fid["value"] < fid["ci_high"]
    small = M.fid_with_ci(x[:20], n_boot=50, model=model, cache_dir=cache)  # re-centred, it crossed 0
    assert 0.0 <= small["ci_low"] < small["value"] < small["ci_high"]
    report = M.evaluate_images(x, y, n_boot=50, model=model, cache_dir=cache)
    assert report["fid"] == pytest.approx(fid["value"])
    assert report["fid_ci"] == pytest.approx([fid["ci_low"], fid["ci_high"]])
    assert report["n"] == 1000 and report["note"] == F.FID_NOTE
    floor = M.real_data_floor(1000, model=model, cache_dir=cache)
    assert report["fid_floor"] == floor["value"] and report["fid_floor_std"] == floor["std"] > 0
    assert report["fid_ratio"] < 1.3  # real digits are within the yardstick
    acc = report["class_accuracy"]
    assert acc == M.class_accuracy(x, y, model=model)
    assert acc["value"] > 0.98 and acc["ci_low"] < acc["value"] <= acc["ci_high"] <= 1.0
    assert M.evaluate_images(x, n_boot=5, model=model, cache_dir=cache)["class_accuracy"] is None
    # with labels, also the floor of real digits in the same class counts
    same = M.real_data_floor(1000, model=model, cache_dir=cache, class_counts=np.bincount(y, minlength=10).tolist())
    assert report["fid_floor_same_mix"] == same["value"] and same["class_counts"] == np.bincount(y).tolist()
    assert report["fid_ratio_same_mix"] == pytest.approx(report["fid"] / same["value"])
    assert "fid_floor_same_mix" not in M.evaluate_images(x, n_boot=5, model=model, cache_dir=cache)


def test_floor_in_exact_class_counts(cache, model):
    """Real digits in fixed class counts: every set holds exactly those counts, and an exact mix scores a
    lower FID than random draws of the same n (the class counts of a random draw vary, and FID reads that)."""
    from ditkit.data.mnist import load_mnist

    _, labels = load_mnist("train")
    counts = np.bincount(labels, minlength=10)
    exact = (counts / counts.sum() * 1000).round().astype(int)
    exact[1] += 1000 - exact.sum()
    mix = M.real_data_floor(1000, model=model, cache_dir=cache, class_counts=exact.tolist())
    rand = M.real_data_floor(1000, model=model, cache_dir=cache)
    assert mix["class_counts"] == exact.tolist() and len(mix["values"]) == M.FLOOR_DRAWS
    assert mix["value"] < rand["value"]
    balanced = M.real_data_floor(1000, model=model, cache_dir=cache, class_counts=[100] * 10)
    assert balanced["value"] != mix["value"]  # each mix has its own cache entry
    assert M.real_data_floor_path(1000, 0, 5, model.sha256, cache, [100] * 10) != \
        M.real_data_floor_path(1000, 0, 5, model.sha256, cache)
    with pytest.raises(DitkitError, match="summing to n = 1000"):
        M.real_data_floor(1000, model=model, cache_dir=cache, class_counts=[10] * 10)
    with pytest.raises(DitkitError, match="fewer digits of class 3"):
        M.real_data_floor(7000, model=model, cache_dir=cache, class_counts=[0, 0, 0, 7000] + [0] * 6)


def test_accuracy_names_the_weak_digits_and_the_misreadings():
    labels = np.array([4] * 10 + [9] * 10 + [7] * 10)
    pred = labels.copy()
    pred[:3] = 9   # three 4s read as 9
    pred[10] = 4   # one 9 read as 4
    pred[20] = 1   # one 7 read as 1
    acc = M._accuracy_dict(pred, labels, 0.05)
    assert acc["value"] == 25 / 30 and acc["per_class"] == {"4": 0.7, "7": 0.9, "9": 0.9}
    assert acc["confusions"] == [{"asked": 4, "read": 9, "count": 3}, {"asked": 7, "read": 1, "count": 1},
                                 {"asked": 9, "read": 4, "count": 1}]
    assert M._accuracy_dict(labels, labels, 0.05)["confusions"] == []
    json.dumps(acc)  # written into RUN/eval/*.json as it is


def test_wilson_interval_at_perfect_accuracy():
    lo, hi = M.wilson_interval(100, 100)
    assert hi == 1.0 and 0.95 < lo < 1.0


# ---------------------------------------------------------------------------------------------
# Bad inputs: one clear error naming what is expected.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "images, match",
    [
        (np.zeros((4, 32, 32), np.uint8), "28"),
        (np.zeros((4, 3, 28, 28), np.uint8), "28"),
        (np.zeros((28, 28), np.uint8), "shape"),
        (np.zeros((4, 28, 28), np.int64), "dtype"),
        (np.full((4, 28, 28), -1.0, np.float32), r"\[0, 1\]"),
        (np.full((4, 28, 28), np.nan, np.float32), r"\[0, 1\]"),
        ([[0] * 28] * 28, "numpy array or torch tensor"),
        (np.zeros((0, 28, 28), np.uint8), "at least"),
    ],
)
def test_bad_images_are_refused(images, match):
    with pytest.raises(C.ImageInputError, match=match) as info:
        C.classify(images)
    assert isinstance(info.value, ValueError) and isinstance(info.value, DitkitError)


def test_bad_metric_inputs(cache, model):
    one = np.zeros((1, 28, 28), np.uint8)
    with pytest.raises(DitkitError, match="at least 2"):
        M.fid_with_ci(one, model=model, cache_dir=cache)
    x = np.zeros((3, 28, 28), np.uint8)
    with pytest.raises(DitkitError, match=r"shape \(3,\)"):
        M.class_accuracy(x, np.zeros(4, np.int64), model=model)
    with pytest.raises(DitkitError, match="0..9"):
        M.class_accuracy(x, np.array([0, 1, 10]), model=model)
    with pytest.raises(DitkitError, match="exceeds"):
        M.real_data_floor(60001, model=model, cache_dir=cache)
    with pytest.raises(DitkitError, match="draws"):
        M.real_data_floor(100, draws=0, model=model, cache_dir=cache)
    with pytest.raises(DitkitError, match="batch_size"):
        C.features(x, model, batch_size=0)
