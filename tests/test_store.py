"""Tests of the storage-update certification store (docs/method.md section 5).

Truth is independent of the store: scipy's float64 pairwise distances for the invariant, and a naive pure-numpy
float64 implementation of the four steps of section 5, one query at a time.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from scipy.spatial import distance

from certssb_jax.store import certified as store_lib, distances
from certssb_jax.store.certified import CertifiedStore, StoreAnswer

_FIELDS = ("pred", "radius_stored", "radius_joint", "margin_stored", "aligned", "trimmed", "stored", "align_source")


def make_stream(seed: int, n: int, dim: int, num_labels: int, num_clusters: int = 3):
  """A clustered random stream: conflicts (aligns and trims) happen often.

  Points lie around a few centers with a spread comparable to the radii, labels are mixed inside clusters,
  about 10% of the queries abstain. Inputs are float32 values (the store's dtype), returned as float64.
  """
  rng = np.random.default_rng(seed)
  centers = rng.uniform(0.0, 1.0, (num_clusters, dim))  # (K, D)
  # Typical intra-cluster distance ~0.4 in every dimension; a per-point scale keeps distances varied in high
  # dimension (where they would otherwise concentrate and every cluster would collapse to one label).
  spread = 0.3 / np.sqrt(dim) * np.exp(0.7 * rng.normal(size=(n, 1)))  # (N, 1)
  x = centers[rng.integers(0, num_clusters, n)] + spread * rng.normal(size=(n, dim))  # (N, D)
  x = x.astype(np.float32).astype(np.float64)
  pred = rng.integers(0, num_labels, n)
  pred[rng.uniform(size=n) < 0.1] = -1
  radius = rng.uniform(0.0, 0.6, n)
  sigma = rng.uniform(0.1, 1.0, n)
  return x, pred, radius, sigma


def reference(x, pred, radius_test, sigma, sigma_min=None):
  """Naive float64 storage-update certification, one query at a time, as docs/method.md section 5 says: every
  answer is stored (radius 0 included), joint radius sigma_min * margin, or J_k - d_k for an aligned answer."""
  sigma_min = sigma if sigma_min is None else sigma_min
  xs, labels, radii, joints = [], [], [], []
  out = {f: [] for f in _FIELDS}
  for i in range(len(pred)):
    c, r = int(pred[i]), float(radius_test[i])
    answer, aligned, trimmed, src = c, False, False, -1
    j = r * sigma_min[i] / sigma[i]
    if c < 0:
      r = j = 0.0
    elif xs:
      d = np.sqrt(np.sum((np.asarray(xs) - x[i]) ** 2, axis=1))
      lab, rad, jnt = np.asarray(labels), np.asarray(radii), np.asarray(joints)
      g = d - rad
      other = lab != c
      inside = other & ((g < 0) | (d == 0))
      if inside.any():  # step 2: align with the ball of largest R_k - d_k
        k = int(np.argmin(np.where(inside, g, np.inf)))
        answer, r, aligned, src = int(lab[k]), float(rad[k] - d[k]), True, k
        j = max(0.0, min(float(jnt[k] - d[k]), r))
      elif other.any():  # step 3: trim
        new = max(0.0, min(r, float(g[other].min())))
        trimmed = new < r
        r = new
        j = r * sigma_min[i] / sigma[i]
    if c >= 0:  # step 4: store
      xs.append(x[i])
      labels.append(answer)
      radii.append(r)
      joints.append(j)
    for f, v in zip(_FIELDS, (answer, r, j, r / sigma[i], aligned, trimmed, c >= 0, src)):
      out[f].append(v)
  return {f: np.asarray(v) for f, v in out.items()}


def feed(store: CertifiedStore, x, pred, radius, sigma, sizes, after=None) -> dict[str, np.ndarray]:
  """Feeds the stream in consecutive calls of the given sizes; ``after(store)`` runs after every call."""
  answers = []
  start = 0
  for size in sizes:
    sl = slice(start, start + size)
    answers.append(store.certify(x[sl], pred[sl], radius[sl], sigma[sl]))
    start += size
    if after is not None:
      after(store)
  assert start == len(pred)
  return {f: np.concatenate([getattr(a, f) for a in answers]) for f in _FIELDS}


def check_invariant(store: CertifiedStore) -> None:
  """Any two stored balls with different labels are disjoint, d >= R_i + R_k exactly, scipy float64 distances.

  Stored radii never change after insertion, so checking the whole store after a call checks every insertion
  of that call too (each pair of a prefix is a pair of the whole).
  """
  x, label, radius = store.stored_arrays()
  x = x.reshape(len(label), int(np.prod(x.shape[1:]))).astype(np.float64)
  assert (radius >= 0).all()
  d = distance.cdist(x, x)  # (n, n)
  conflict = label[:, None] != label[None, :]
  bad = conflict & (d < radius[:, None] + radius[None, :])
  assert not bad.any(), f"{bad.sum() // 2} overlapping pairs with different labels"
  # The documented safety margin: each ball was made at least SAFETY * (d + R) smaller than needed. A point
  # answered with radius 0 may lie exactly on the sphere of an (open) ball of another label: no margin there.
  balls = (radius[:, None] > 0) & (radius[None, :] > 0)
  thin = conflict & balls & (d - (radius[:, None] + radius[None, :]) < 0.5 * distances.SAFETY * d)
  assert not thin.any(), f"{thin.sum() // 2} pairs closer than the safety margin"


def check_answers(ans: dict[str, np.ndarray], store: CertifiedStore, x, pred, radius) -> None:
  """Per-answer properties: abstentions, align geometry against the source ball, trimming never grows R."""
  xs, label, rad = store.stored_arrays()
  xs = xs.reshape(len(label), int(np.prod(xs.shape[1:]))).astype(np.float64)
  abst = pred < 0
  assert (ans["pred"][abst] == -1).all() and (ans["radius_stored"][abst] == 0).all()
  assert not (ans["stored"][abst] | ans["aligned"][abst] | ans["trimmed"][abst]).any()
  for i in np.nonzero(ans["aligned"])[0]:  # an aligned answer lies inside the ball it took the label from
    k = ans["align_source"][i]
    assert ans["pred"][i] == label[k] != pred[i]
    d = distance.cdist(x[i:i + 1].reshape(1, -1), xs[k:k + 1])[0, 0]
    assert d < rad[k]
    assert d + ans["radius_stored"][i] <= rad[k]
  plain = ~ans["aligned"] & ~abst
  assert (ans["pred"][plain] == pred[plain]).all()
  assert (ans["radius_stored"][plain] <= radius[plain]).all()  # trimming never increases a radius
  np.testing.assert_array_equal(ans["trimmed"][plain], ans["radius_stored"][plain] < radius[plain])
  assert not (ans["trimmed"] & ans["aligned"]).any()
  np.testing.assert_array_equal(ans["stored"], pred >= 0)
  assert (ans["radius_joint"] <= ans["radius_stored"]).all() and (ans["radius_joint"] >= 0).all()


def assert_same_answers(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
  for f in _FIELDS:
    np.testing.assert_array_equal(a[f], b[f], err_msg=f)


@pytest.mark.parametrize("dim,num_labels,n", [(2, 2, 120), (10, 3, 120), (784, 2, 80), (784, 3, 80)])
def test_stream_properties(dim, num_labels, n):
  """Invariant after every call, align/trim geometry, and the same answers whatever the batching."""
  x, pred, radius, sigma = make_stream(dim * 10 + num_labels, n, dim, num_labels)
  runs = {}
  rng = np.random.default_rng(dim)
  random_sizes = np.diff(np.unique(np.concatenate([[0, n], rng.integers(1, n, 12)])))
  for name, sizes in [("one_by_one", [1] * n), ("sevens", [7] * (n // 7) + [n % 7] * (n % 7 > 0)),
                      ("random", random_sizes), ("all", [n])]:
    store = CertifiedStore((dim,), chunk_size=16)
    ans = feed(store, x, pred, radius, sigma, sizes, after=check_invariant)
    check_answers(ans, store, x, pred, radius)
    runs[name] = ans
  ans = runs["all"]
  assert ans["aligned"].sum() >= 3 and ans["trimmed"].sum() >= 3, "the stream must exercise both steps"
  for name in ("one_by_one", "sevens", "random"):
    assert_same_answers(runs[name], ans)


@pytest.mark.parametrize("dim,num_labels", [(2, 2), (10, 3), (784, 3)])
def test_matches_naive_reference(dim, num_labels):
  """Identical labels and flags as the naive float64 implementation; radii equal up to the safety margin."""
  x, pred, radius, sigma = make_stream(7 + dim, 100, dim, num_labels)
  ref = reference(x, pred, radius, sigma)
  store = CertifiedStore((dim,), chunk_size=32, query_batch=16)
  ans = store.certify(x, pred, radius, sigma)
  for f in ("pred", "aligned", "trimmed", "stored", "align_source"):
    np.testing.assert_array_equal(ans.__getattribute__(f), ref[f], err_msg=f)
  np.testing.assert_allclose(ans.radius_joint, ref["radius_joint"], rtol=1e-8, atol=1e-8)
  # The store lowers every radius by SAFETY * (d + R) ~ 2e-10 (and later trims inherit it): atol 1e-8.
  np.testing.assert_allclose(ans.radius_stored, ref["radius_stored"], rtol=1e-8, atol=1e-8)
  np.testing.assert_allclose(ans.margin_stored, ref["margin_stored"], rtol=1e-8, atol=1e-7)
  assert ref["aligned"].sum() >= 3 and ref["trimmed"].sum() >= 3
  stats = store.stats()
  assert stats["num_aligned"] == ref["aligned"].sum() and stats["num_trimmed"] == ref["trimmed"].sum()
  assert stats["size"] == ref["stored"].sum() == stats["num_stored"]
  assert stats["num_queries"] == 100 and stats["num_abstained"] == (pred < 0).sum()
  _, label, _ = store.stored_arrays()
  assert stats["label_counts"] == {int(l): int((label == l).sum()) for l in np.unique(label)}


def test_float64_store_matches_reference():
  """With dtype float64 the queries are not rounded: still identical to the reference."""
  x, pred, radius, sigma = make_stream(3, 80, 5, 2)
  x = x + np.random.default_rng(0).normal(size=x.shape) * 1e-9  # not float32-representable
  ref = reference(x, pred, radius, sigma)
  ans = CertifiedStore((5,), dtype=np.float64, chunk_size=8).certify(x, pred, radius, sigma)
  np.testing.assert_array_equal(ans.pred, ref["pred"])
  np.testing.assert_allclose(ans.radius_stored, ref["radius_stored"], rtol=1e-8, atol=1e-8)


def test_save_load_mid_stream(tmp_path):
  """Save + load in the middle of a stream: the rest of the stream gets the same answers and counters."""
  x, pred, radius, sigma = make_stream(11, 120, 10, 3)
  straight = CertifiedStore((10,), chunk_size=16)
  want = feed(straight, x, pred, radius, sigma, [50, 70])
  first = CertifiedStore((10,), chunk_size=16)
  got1 = feed(first, x[:50], pred[:50], radius[:50], sigma[:50], [50])
  path = tmp_path / "store.npz"
  first.save(path)
  first.save(path)  # overwriting is atomic too
  assert sorted(os.listdir(tmp_path)) == ["store.npz"]  # no temporary file left behind
  loaded = CertifiedStore.load(path)
  assert len(loaded) == len(first)
  for a, b in zip(loaded.stored_arrays(), first.stored_arrays()):
    np.testing.assert_array_equal(a, b)
  got2 = feed(loaded, x[50:], pred[50:], radius[50:], sigma[50:], [70])
  assert_same_answers({f: np.concatenate([got1[f], got2[f]]) for f in _FIELDS}, want)
  s1, s2 = loaded.stats(), straight.stats()
  for key in ("size", "label_counts", "num_queries", "num_aligned", "num_trimmed", "num_abstained"):
    assert s1[key] == s2[key], key
  with np.load(path) as z:  # the documented file layout
    assert {"x", "label", "radius", "meta"} <= set(z.files)
    assert z["x"].shape == (len(first), 10) and z["label"].dtype == np.int64


def test_hand_built_conflict():
  """Exact trim and align against the formulas of section 5, on points whose distances are exact."""
  store = CertifiedStore((2,))
  sigma = 0.5
  pts = np.array([[0.0, 0.0], [3.0, 0.0], [0.5, 0.0], [10.0, 10.0], [1.0, 0.0]])
  ans = store.certify(pts[:1], [0], [1.0], sigma)  # ball A: label 0, R = 1 around the origin
  assert ans.stored[0] and not ans.trimmed[0] and ans.radius_stored[0] == 1.0
  ans = store.certify(pts[1:2], [1], [5.0], sigma)  # d = 3 to A: trimmed to 3 - 1 = 2
  assert ans.pred[0] == 1 and ans.trimmed[0] and not ans.aligned[0] and ans.stored[0]
  assert ans.radius_stored[0] == pytest.approx(2.0, rel=1e-9) and ans.radius_stored[0] <= 2.0
  assert ans.margin_stored[0] == pytest.approx(4.0, rel=1e-9)
  ans = store.certify(pts[2:3], [1], [2.0], sigma)  # inside A (d = 0.5 < 1): takes label 0, radius 0.5
  assert ans.aligned[0] and ans.pred[0] == 0 and ans.align_source[0] == 0 and not ans.trimmed[0]
  assert ans.radius_stored[0] == pytest.approx(0.5, rel=1e-9) and ans.radius_stored[0] <= 0.5
  ans = store.certify(pts[3:4], [1], [0.25], sigma)  # far from everything: untouched
  assert ans.radius_stored[0] == 0.25 and not ans.trimmed[0] and not ans.aligned[0]
  ans = store.certify(pts[4:5], [1], [0.5], sigma)  # on A's sphere (d = R_A): not inside, trimmed to 0
  assert ans.pred[0] == 1 and not ans.aligned[0] and ans.trimmed[0]
  assert ans.radius_stored[0] == 0.0 and ans.stored[0]  # stored as a point: no later ball of label 0 covers it
  assert len(store) == 5
  check_invariant(store)


def test_align_takes_largest_remaining_radius():
  """Inside two balls of another class: the answer comes from the one with the largest R_k - d_k."""
  store = CertifiedStore((2,))
  store.certify(np.array([[0.0, 0.0], [0.5, 0.0]]), [2, 2], [1.0, 1.0], 1.0)  # same label: may overlap
  ans = store.certify(np.array([[0.25, 0.0], [0.375, 0.0]]), [1, 0], [3.0, 3.0], 1.0)
  # Query 1: d = 0.25 to both: the first (earliest) wins the tie; query 2: 0.875 to ball 1 beats 0.625.
  np.testing.assert_array_equal(ans.pred, [2, 2])
  np.testing.assert_array_equal(ans.align_source, [0, 1])
  np.testing.assert_allclose(ans.radius_stored, [0.75, 0.875], rtol=1e-9)


def test_invariant_at_large_scale():
  """Aligned balls next to a huge ball of another label keep the invariant and the safety margin exactly.

  Ball A (label 0, radius 0.01) touches ball B (label 1, radius ~1000) in float64. Queries inside A are
  aligned to label 0; by the triangle inequality their balls miss B, but only by rounding-level amounts at the
  scale of B: the store's re-trim against B is what keeps the margin (and, in general, the invariant).
  """
  big, small = 1e3, 1e-2
  radius_b = big - small
  while small + radius_b <= big:  # the largest radius of B that still passes the float64 check
    radius_b = np.nextafter(radius_b, np.inf)
  radius_b = np.nextafter(radius_b, 0.0)
  for t in np.linspace(0.05, 0.95, 7) * small:
    store = CertifiedStore.from_arrays(np.array([[0.0], [big]]), np.array([0, 1]), np.array([small, radius_b]),
                                       dtype=np.float64)
    ans = store.certify(np.array([[t]]), [1], [1.0], 1.0)
    assert ans.aligned[0] and ans.pred[0] == 0 and ans.stored[0]
    assert ans.radius_stored[0] == pytest.approx(small - t, rel=1e-2)
    x, _, radius = store.stored_arrays()
    d = abs(x[2, 0] - x[1, 0])
    assert d >= radius[2] + radius[1]
    assert d - (radius[2] + radius[1]) >= 0.5 * distances.SAFETY * d


def test_chunk_size_smaller_than_store():
  """Small chunks (many, padded) answer like one big chunk: with fallbacks forced by one candidate, with
  streamed chunks (no device cache) and with a cache that holds only some chunks."""
  x, pred, radius, sigma = make_stream(5, 120, 10, 3)
  big = CertifiedStore((10,), chunk_size=4096).certify(x, pred, radius, sigma)
  for kwargs in (dict(chunk_size=3), dict(chunk_size=3, num_candidates=1), dict(chunk_size=5, query_batch=8),
                 dict(chunk_size=4, device_cache_bytes=0), dict(chunk_size=4, device_cache_bytes=300)):
    store = CertifiedStore((10,), **kwargs)
    small = feed(store, x, pred, radius, sigma, [40, 40, 40])
    assert_same_answers(small, {f: getattr(big, f) for f in _FIELDS})
    if kwargs.get("num_candidates") == 1:
      assert store.stats()["num_chunk_fallbacks"] > 0


def test_recompute_rule_is_exhaustive():
  """Recomputing every pair exactly (tol_rel huge) gives the same answers as the default selective rule."""
  x, pred, radius, sigma = make_stream(9, 100, 784, 3)
  sel_store = CertifiedStore((784,), chunk_size=16)
  sel = sel_store.certify(x, pred, radius, sigma)
  all_store = CertifiedStore((784,), chunk_size=16, tol_rel=1e30)
  every = all_store.certify(x, pred, radius, sigma)
  assert_same_answers({f: getattr(sel, f) for f in _FIELDS}, {f: getattr(every, f) for f in _FIELDS})
  assert sel_store.stats()["num_exact_pairs"] < all_store.stats()["num_exact_pairs"]


@pytest.mark.parametrize("dim", [784, 20000])
def test_float32_distance_error_within_bound(dim):
  """The kernel's float32 squared distances are within default_tol_rel(D) * (|a|^2 + |b|^2) of float64 truth."""
  rng = np.random.default_rng(dim)
  a = rng.uniform(0, 1, (16, dim)).astype(np.float32)
  b = np.concatenate([a[:8] + rng.normal(size=(8, dim)).astype(np.float32) * 1e-3,  # near-duplicates
                      rng.uniform(0, 1, (8, dim)).astype(np.float32)])
  a64, b64 = a.astype(np.float64), b.astype(np.float64)
  sa, sb = np.sum(a64 * a64, 1), np.sum(b64 * b64, 1)
  d2 = np.asarray(distances.pair_sq_dist_kernel(a, sa.astype(np.float32), b, sb.astype(np.float32)))
  exact = distance.cdist(a64, b64, "sqeuclidean")
  err = np.abs(d2.astype(np.float64) - exact)
  bound = distances.default_tol_rel(dim) * (sa[:, None] + sb[None, :])
  assert (err <= bound).all()
  assert err.max() > 0  # the float32 path really is inexact, so the rule matters


def test_margin_and_abstain():
  x = np.array([[0.0], [5.0], [9.0]])
  ans = CertifiedStore((1,)).certify(x, [-1, 1, 0], [3.0, 2.0, 1.0], np.array([1.0, 0.5, 2.0]))
  np.testing.assert_array_equal(ans.pred, [-1, 1, 0])
  np.testing.assert_allclose(ans.radius_stored, [0.0, 2.0, 1.0])
  np.testing.assert_allclose(ans.margin_stored, [0.0, 4.0, 0.5])
  np.testing.assert_array_equal(ans.stored, [False, True, True])
  np.testing.assert_allclose(ans.radius_joint, ans.radius_stored)  # no sigma_min: joint = test-input radius
  assert isinstance(ans, StoreAnswer)


def test_kernel_compiles_once_per_shape(monkeypatch):
  """Repeated blocks of the same bucket reuse one compiled kernel, whatever the store size: once the bucket's
  shape is compiled, the kernel's body (which calls ``_sq_dist``) is never traced again."""
  x, pred, radius, sigma = make_stream(13, 64, 6, 2)
  store = CertifiedStore((6,), chunk_size=8)
  store.certify(x[:34], pred[:34], radius[:34], sigma[:34])
  store.certify(x[34:40], pred[34:40], radius[34:40], sigma[34:40])  # compiles the bucket-8 shape
  traces = []
  real = distances._sq_dist  # pylint: disable=protected-access
  monkeypatch.setattr(distances, "_sq_dist", lambda *a: traces.append(1) or real(*a))
  for i in range(40, 64, 6):  # blocks of 6 -> bucket 8, store growing over several chunks
    store.certify(x[i:i + 6], pred[i:i + 6], radius[i:i + 6], sigma[i:i + 6])
  assert not traces
  distances.chunk_candidates_kernel.clear_cache()  # the counter does see a trace
  store.certify(x[40:46], pred[40:46], radius[40:46], sigma[40:46])
  assert traces


def test_validation():
  store = CertifiedStore((2, 2))
  x = np.zeros((3, 2, 2))
  ok = dict(pred=[0, 1, -1], radius_test=[0.1, 0.2, 0.0], sigma_x=0.5)
  with pytest.raises(ValueError, match="shape"):
    store.certify(np.zeros((3, 4)), **ok)
  with pytest.raises(ValueError, match="NaN"):
    store.certify(np.full((3, 2, 2), np.nan), **ok)
  with pytest.raises(ValueError, match="radius_test.*NaN"):
    store.certify(x, [0, 1, -1], [0.1, np.nan, 0.0], 0.5)
  with pytest.raises(ValueError, match="negative radius"):
    store.certify(x, [0, 1, -1], [0.1, -0.2, 0.0], 0.5)
  with pytest.raises(ValueError, match="sigma_x"):
    store.certify(x, [0, 1, -1], [0.1, 0.2, 0.0], 0.0)
  with pytest.raises(ValueError, match="sigma_x"):
    store.certify(x, [0, 1, -1], [0.1, 0.2, 0.0], [0.5, -1.0, 0.5])
  with pytest.raises(ValueError, match="pred"):
    store.certify(x, [0, -2, 1], [0.1, 0.2, 0.0], 0.5)
  with pytest.raises(ValueError, match="pred"):
    store.certify(x, [0.0, 1.0, 1.0], [0.1, 0.2, 0.0], 0.5)
  with pytest.raises(ValueError, match="pred has shape"):
    store.certify(x, [0, 1], [0.1, 0.2, 0.0], 0.5)
  with pytest.raises(ValueError, match="dtype"):
    CertifiedStore((2,), dtype=np.float16)
  assert len(store) == 0  # nothing was stored by the rejected calls
  ans = store.certify(x[:0], [], [], 0.5)  # an empty call is fine
  assert ans.pred.shape == (0,)


def test_a_point_answered_with_radius_zero_limits_later_balls():
  """An answer trimmed to radius 0 is still stored: a later ball of another label stops short of it, and a
  later query at exactly that point takes its label."""
  store = CertifiedStore((1,), dtype=np.float64)
  store.certify(np.array([[0.0]]), [0], [1.0], 1.0)  # ball A: label 0, radius 1
  ans = store.certify(np.array([[1.0]]), [1], [0.5], 1.0)  # on A's sphere: answered 1, trimmed to 0
  assert ans.pred[0] == 1 and ans.radius_stored[0] == 0 and ans.stored[0]
  ans = store.certify(np.array([[1.5]]), [0], [2.0], 1.0)  # label 0 near the point (d = 0.5): trimmed to 0.5
  assert ans.pred[0] == 0 and ans.trimmed[0] and ans.radius_stored[0] == pytest.approx(0.5, rel=1e-9)
  ans = store.certify(np.array([[1.0]]), [0], [0.3], 1.0)  # the very same point with label 0: aligned to 1
  assert ans.aligned[0] and ans.pred[0] == 1 and ans.radius_stored[0] == 0
  x, label, radius = store.stored_arrays()
  assert store_lib.audit(x, label, radius)[0] == 0


def test_joint_radius_of_answers_by_hand():
  """Plain answers: sigma_min / sigma_x times the stored radius; aligned ones: J_k - d_k (capped at R)."""
  store = CertifiedStore((1,), dtype=np.float64)
  ans = store.certify(np.array([[0.0], [10.0]]), [0, 1], [2.0, 1.0], np.array([0.5, 0.5]),
                      sigma_min=np.array([0.25, 0.5]))
  np.testing.assert_allclose(ans.radius_joint, [1.0, 1.0])  # 2 * 0.25 / 0.5 and 1 * 0.5 / 0.5
  ans = store.certify(np.array([[0.5], [8.5]]), [1, 0], [3.0, 3.0], 0.5, sigma_min=0.5)
  # Query 1 lies in ball 0 (d = 0.5): label 0, R = 2 - 0.5 = 1.5, J = 1 - 0.5 = 0.5. Query 2 is 1.5 from ball 1
  # (R = 1) and 8 from ball 0 (other label is only ball 1): trimmed to 0.5, J = 0.5 * 0.5 / 0.5.
  np.testing.assert_array_equal(ans.pred, [0, 0])
  np.testing.assert_allclose(ans.radius_stored, [1.5, 0.5], rtol=1e-8)
  np.testing.assert_allclose(ans.radius_joint, [0.5, 0.5], rtol=1e-8)
  ans = store.certify(np.array([[0.75]]), [1], [1.0], 0.5, sigma_min=0.5)  # inside balls 0 and 2
  assert ans.align_source[0] == 0  # R_k - d_k ties at 1.25 (2 - 0.75, 1.5 - 0.25): the earliest ball wins
  np.testing.assert_allclose(ans.radius_joint, [1.0 - 0.75], rtol=1e-8)  # J_0 - d_0 (J_2 - d_2 is 0.25 too)
  with pytest.raises(ValueError, match="sigma_min"):
    store.certify(np.array([[3.0]]), [1], [1.0], 0.5, sigma_min=0.6)


def test_audit_counts_contradictions_like_a_naive_loop():
  """The audit against scipy's pairwise distances, on raw (contradicting) certificates and on store answers."""
  for dim, seed in ((2, 0), (784, 1)):
    x, pred, radius, sigma = make_stream(seed, 150, dim, 3)
    d = distance.cdist(x, x)
    ok = pred >= 0
    naive = np.triu((pred[:, None] != pred[None, :]) & ok[:, None] & ok[None, :] &
                    (d < radius[:, None] + radius[None, :]), k=1)
    count, pairs = store_lib.audit(x, pred, radius, max_pairs=5)
    assert count == naive.sum() > 0
    assert len(pairs) == 5 and all(naive[i, k] for i, k in pairs)
    ans = CertifiedStore((dim,)).certify(x, pred, radius, sigma)
    assert store_lib.audit(x, ans.pred, ans.radius_stored)[0] == 0
  assert store_lib.audit(np.zeros((1, 3)), [0], [1.0])[0] == 0
