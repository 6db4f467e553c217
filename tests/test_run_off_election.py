"""Run-off Election: its certificate against brute force over the adversary's buckets and rankings (DPA and Finite
Aggregation), at least the reference code's DPA+ROE certificate, the base defense's with two classes; a whole run
that recounts from the ranks it saved and shares its trained members with DPA."""

import csv
import itertools
import os

from conftest import tiny_config  # pylint: disable=g-bad-import-order
import numpy as np

from certssb_jax import defenses
from certssb_jax.certify import kernel
from certssb_jax.defenses import (
  INSERTIONS_DELETIONS,
  MODIFICATIONS,
  bucket_aggregation as fa,
  partition,
  run_off_election as roe,
)
from certssb_jax.experiment import config as config_lib, identity, pipeline


def _winner(rankings):
  """The run-off winner of one query, written out round by round: rankings (M,) tuples, best class first."""
  k = len(rankings[0])
  first = [sum(r[0] == a for r in rankings) for a in range(k)]
  f1, f2 = sorted(range(k), key=lambda a: (-first[a], a))[:2]
  for_f1 = sum(r.index(f1) < r.index(f2) for r in rankings)
  for_f2 = len(rankings) - for_f1
  return f1 if for_f1 > for_f2 or (for_f1 == for_f2 and f1 < f2) else f2


def _brute(rankings, feeds):
  """The most buckets the adversary can take, setting every ranking of their members at will, without changing
  the winner."""
  c = _winner(rankings)
  orders = list(itertools.permutations(range(len(rankings[0]))))
  for r in range(1, len(feeds) + 1):
    for taken in itertools.combinations(range(len(feeds)), r):
      hit = sorted(set(np.asarray(feeds)[list(taken)].ravel().tolist()))
      for chosen in itertools.product(orders, repeat=len(hit)):
        changed = list(rankings)
        for m, order in zip(hit, chosen):
          changed[m] = order
        if _winner(changed) != c:
          return r - 1
  return len(feeds)


def _ranks(rankings):
  """(M, 1, K) ranks of one query's rankings."""
  return np.array([[np.argsort(r)] for r in rankings], np.uint8)


def _random_rankings(rs, m, k):
  favourite = rs.dirichlet(np.ones(k) * 0.7)
  return [tuple(rs.choice(k, size=k, replace=False, p=favourite)) for _ in range(m)]


def test_the_certificate_is_sound_and_mostly_tight_against_brute_force():
  rs = np.random.RandomState(0)
  cases = [(dpa_k, 1, 3) for dpa_k in (3, 4, 5)] + [(3, 1, 4), (2, 2, 3)]  # (k, d, classes)
  tight = total = 0
  for trial in range(60):
    k, d, num_classes = cases[trial % len(cases)]
    feeds = fa.members_of_buckets(fa.shifts(trial, d, k * d), k * d) if d > 1 else np.arange(k)[:, None]
    rankings = _random_rankings(rs, k * d, num_classes)
    pred, _, _, cert = roe.certified_buckets(_ranks(rankings), feeds)
    truth = _brute(rankings, feeds)
    assert pred[0] == _winner(rankings)
    assert cert[0] <= truth, (rankings, feeds.tolist(), cert[0], truth)
    tight += cert[0] == truth
    total += 1
  assert tight >= 0.8 * total, (tight, total)  # mostly tight, not just sound


def test_eliminating_the_winner_in_round_one_is_counted():
  # class 0 leads round 1 and is every member's first or second choice, so it wins every run-off it reaches: the
  # adversary's cheapest way is to push 1 and 2 past it in round 1, which the random cases above rarely need
  for d, first in ((1, (0,) * 4 + (1,) * 3 + (2,) * 3), (2, (0,) * 4 + (1,) * 3 + (2,) * 3),
                   (1, (0,) * 5 + (1,) * 4 + (2,) * 4)):
    rankings = [(a, 0, 3 - a) if a else (0, 1, 2) for a in first]
    m = len(first)
    feeds = fa.members_of_buckets(fa.shifts(5, d, m), m) if d > 1 else np.arange(m)[:, None]
    cert = roe.certified_buckets(_ranks(rankings), feeds)[3][0]
    assert cert == _brute(rankings, feeds), (first, cert)


def _reference_dpa_roe(ranks):
  """The reference code's DPA+ROE certificate (k1rezaei/DPA-election, dpa_roe_certify.py) of every query, its
  round-1 elimination bound from its dynamic programme over the two gaps."""
  def dp(g1, g2):  # fewest flips closing both gaps, each flip closing one gap by 2 and the other by 1 at most
    table = np.zeros((g1 + 3, g2 + 3), np.int64)
    for i in range(g1 + 1):
      for j in range(g2 + 1):
        if i == 0 and j == 0:
          table[i, j] = 0
        elif (i <= 1 and j <= 2) or (i <= 2 and j <= 1):
          table[i, j] = 1
        elif j <= 1:
          table[i, j] = (i + 1) // 2
        elif i <= 1:
          table[i, j] = (j + 1) // 2
        else:
          table[i, j] = 1 + min(table[i - 2, j - 1], table[i - 1, j - 2])
    return table[g1, g2]

  _, n, k = ranks.shape
  c, c_sec, votes, margins = roe.run_off_votes(ranks)
  out = []
  for q in range(n):
    p, cp = votes[q], int(c[q])
    cert1 = min((dp(max(p[cp] - p[a] + (a > cp), 0), max(p[cp] - p[b] + (b > cp), 0))
                 for a in range(k) for b in range(k) if len({a, b, cp}) == 3), default=10 ** 9)
    cert2 = min(max(-(-max(p[c_sec[q]] - p[a] + (a > c_sec[q]), 0) // 2), -(-(margins[q, a] + (a > cp)) // 2))
                for a in range(k) if a != cp)
    out.append(min(cert1, cert2) - 1)
  return np.array(out)


def test_dpa_roe_certifies_at_least_what_the_reference_code_does_and_predicts_the_same():
  rs = np.random.RandomState(1)
  for k, num_classes in ((7, 3), (20, 4), (50, 10)):
    favourite = rs.dirichlet(np.ones(num_classes), size=40)  # (N, K): each query's likely classes
    probs = rs.dirichlet(np.ones(num_classes) * 0.3, size=(k, 40)) + favourite[None]
    ranks = kernel.class_ranks(probs)
    pred, _, _, cert = roe.certified_buckets(ranks, np.arange(k)[:, None])
    want = _reference_dpa_roe(ranks)
    assert (cert >= want).all(), (cert, want)
    rankings = [[tuple(np.argsort(ranks[m, q])) for m in range(k)] for q in range(40)]
    np.testing.assert_array_equal(pred, [_winner(r) for r in rankings])


def test_with_two_classes_the_run_off_is_the_base_defense():
  rs = np.random.RandomState(2)
  ranks = kernel.class_ranks(rs.rand(12, 60, 2))
  preds = ranks.argmin(-1)
  for key in ("sample", "position"):
    got = roe.certificate(ranks, np.arange(12)[:, None], key)
    want = partition.certificate(kernel.votes_from_preds(preds, 2), key)
    np.testing.assert_array_equal(got.pred, want.pred)
    for threat in want.counts:
      np.testing.assert_array_equal(got.counts[threat], want.counts[threat])
    offsets = fa.shifts(0, 3, 12)
    got = roe.certificate(ranks, fa.members_of_buckets(offsets, 12), key)
    want = fa.certificate(preds, offsets, 2, key)
    np.testing.assert_array_equal(got.pred, want.pred)
    for threat in want.counts:
      np.testing.assert_array_equal(got.counts[threat], want.counts[threat])


def test_a_run_recounts_from_its_ranks_and_trains_dpas_members(tmp_path):
  c = tiny_config(**{"defense.name": "dpa_roe", "train.num_models": 8, "train.epochs": 2, "data.classes": "0,1,2",
                     "undefended.enabled": False})
  summary = pipeline.run(c, str(tmp_path))
  assert summary["method"] == "DPA+ROE" and summary["defense"]["vote"] == "run-off election"
  votes = np.load(tmp_path / "votes.npz")
  with open(tmp_path / "per_sample.csv") as f:
    rows = list(csv.DictReader(f))
  for split in ("clean", "triggered"):
    ranks = votes[f"{split}_ranks"]
    np.testing.assert_array_equal(ranks.argmin(-1), votes[f"{split}_preds"])  # the ranks are the votes' classes'
    cert = roe.certificate(ranks, np.arange(8)[:, None])
    got = [r for r in rows if r["split"] == split]
    np.testing.assert_array_equal([int(r["certified_insertions_deletions"]) for r in got],
                                  cert.counts[INSERTIONS_DELETIONS])
    np.testing.assert_array_equal([int(r["certified_modifications"]) for r in got], cert.counts[MODIFICATIONS])
  resolved = config_lib.resolve(c)
  as_dpa = config_lib.resolve(tiny_config(**{"defense.name": "dpa", "train.num_models": 8, "train.epochs": 2,
                                             "data.classes": "0,1,2", "undefended.enabled": False}))
  assert identity.training_key(config_lib.to_json(resolved)) == identity.training_key(config_lib.to_json(as_dpa))
  assert defenses.REGISTRY["fa_roe"].trains == "finite_aggregation"


def test_the_count_study_reads_both_votes_from_one_run_and_writes_its_page(tmp_path):
  from conftest import write_tiny_config  # pylint: disable=g-import-not-at-top
  from helpers import run_module  # pylint: disable=g-import-not-at-top

  spec = write_tiny_config(tmp_path / "c.py", **{"data.classes": "0,1,2", "undefended.enabled": False,
                                                 "train.epochs": 2})
  page = tmp_path / "docs" / "count.md"
  proc = run_module("certssb_jax.studies", "counts", "--config", spec, "--workdir", str(tmp_path / "w"), "--ks", "4",
                    "--fa_ks", "2", "--spread", "2", "--results_md", str(page), "--noprogress")
  assert proc.returncode == 0, proc.stderr[-3000:]
  from certssb_jax import count_study  # pylint: disable=g-import-not-at-top

  rows = count_study.read_rows(str(tmp_path / "w" / "k4" / "dpa_roe"))
  assert [r.method for r in rows] == ["DPA", "DPA+ROE"]
  votes = np.load(tmp_path / "w" / "k4" / "dpa_roe" / "votes.npz")
  want = partition.certificate(kernel.votes_from_preds(votes["clean_preds"].astype(np.int64), 3))
  np.testing.assert_array_equal(rows[0].certified, want.counts[INSERTIONS_DELETIONS])
  with open(tmp_path / "w" / "k4" / "dpa_roe" / "per_sample.csv") as f:
    clean = [r for r in csv.DictReader(f) if r["split"] == "clean"]
  np.testing.assert_array_equal(rows[1].certified, [int(r["certified_insertions_deletions"]) for r in clean])
  text = page.read_text()
  for method in ("| DPA | 4 |", "| DPA+ROE | 4 |", "| FA | 2 | 4 |", "| FA+ROE | 2 | 4 |"):
    assert method in text, text
  assert (tmp_path / "docs" / "figures" / "count_family_mnist.png").exists()


def test_the_count_study_stops_with_one_line_before_any_work(tmp_path):
  from helpers import run_module  # pylint: disable=g-import-not-at-top

  proc = run_module("certssb_jax.studies", "counts", "--config", "configs/quickstart.py", "--workdir",
                    str(tmp_path / "w"), "--ks", "50,many")
  assert proc.returncode == 2 and "--ks takes numbers, e.g. --ks 32,64; got 50,many" in proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
  assert not os.path.exists(tmp_path / "w")
