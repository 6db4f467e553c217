"""The figures read without the README: a flat or one-valued panel says why in a sentence, legends stay off the
data, no curve hides under another, and every marker is named (certssb_jax/experiment/report.py,
certssb_jax/envelope/figures.py).

The plotting functions save and close their figures; the fixture keeps each figure instead of writing it, so its
texts, lines and legends can be read here.
"""

import types

from conftest import tiny_config  # pylint: disable=g-bad-import-order
from matplotlib.figure import Figure
import numpy as np
import pytest

from certssb_jax.data.attacked import SPLITS
from certssb_jax.envelope import answers as answers_lib, comparison, figures as figures_lib
from certssb_jax.experiment import config as config_lib, report


@pytest.fixture
def saved(monkeypatch):
  """The figures the plotting functions save, kept for inspection instead of written."""
  figures = []
  monkeypatch.setattr(Figure, "savefig", lambda self, *args, **kwargs: figures.append(self))
  return figures


def _texts(ax) -> str:
  return "\n".join(t.get_text() for t in ax.texts)


def _attacked(n_train: int = 40, n_test: int = 10):
  y = {"clean": np.ones(n_test, np.int64), "triggered": np.ones(n_test, np.int64)}
  return types.SimpleNamespace(data=types.SimpleNamespace(name="mnist", classes=(0, 1)),
                               poison_indices=np.array([0, 1]),
                               splits={s: types.SimpleNamespace(y=v) for s, v in y.items()})


def _answers(pred, radius):
  return {s: types.SimpleNamespace(pred=np.asarray(pred), radius_stored=np.asarray(radius, float))
          for s in ("clean", "triggered")}


def test_a_flat_poison_budget_panel_says_why():
  attacked = _attacked(n_test=4)
  answers = _answers([1, 1, 0, -1], [0.29, 0.2, 0.29, 0.0])
  none = {s: np.array([-1, -1, -1, -1]) for s in ("clean", "triggered")}
  # the margin ceiling caps every radius below the trigger norm (the quickstart's M = 60 at t = 1)
  fig = Figure()
  ax = fig.add_subplot()
  report._plot_budget_panel(ax, attacked, answers, none, 1.0, 1.18, 0.25, True)  # pylint: disable=protected-access
  assert "the margin ceiling x sigma_x, 1.18 x 0.25 = 0.295, is below t" in _texts(ax)
  # the ceiling would allow it, the answers do not reach it
  note = report.budget_note(attacked, answers, none, 0.5, 2.43, 0.25, True)
  assert "the largest certified test-input radius, 0.29, is below t" in note
  # a searched run certifies the test input alone; a run whose answers certify poisoned images needs no note
  some = {s: np.array([3, 0, 5, -1]) for s in ("clean", "triggered")}
  assert "searched sigma_x" in report.budget_note(attacked, answers, some, 0.1, 2.43, 0.25, False)
  assert report.budget_note(attacked, answers, some, 0.1, 2.43, 0.25, True) is None
  # a certificate of a wrong answer (input 2, class 0) does not count
  wrong_only = {s: np.array([-1, -1, 5, -1]) for s in ("clean", "triggered")}
  assert report.budget_note(attacked, answers, wrong_only, 0.1, 2.43, 0.25, True) is not None


def test_a_sigma_histogram_of_one_value_says_so_and_keeps_its_legend_off_the_bars(saved):
  cfg = config_lib.resolve(tiny_config())  # sigma_0 0.25, search range [0.25, 0.375]
  attacked = _attacked()
  at_sigma_0 = {s: np.full(10, 0.25) for s in ("clean", "triggered")}
  report.plot_sigma_histogram("unused.png", cfg, attacked, np.full(40, 0.25), at_sigma_0)
  train_ax, test_ax = saved[-1].axes
  assert "every one of the training samples at sigma_0 = 0.25\n(38 clean, 2 poisoned)" in _texts(train_ax)
  assert "every one of the test inputs at sigma_0 = 0.25" in _texts(test_ax)
  assert not train_ax.patches and not test_ax.patches and test_ax.get_legend() is None  # no degenerate bar
  searched = {s: np.linspace(0.25, 0.375, 10) for s in ("clean", "triggered")}
  report.plot_sigma_histogram("unused.png", cfg, attacked, np.full(40, 0.25), searched)
  fig = saved[-1]
  train_ax, test_ax = fig.axes
  assert "every one of the training samples" in _texts(train_ax) and not _texts(test_ax).startswith("every")
  assert test_ax.patches  # the searched sigma_x as a histogram
  fig.canvas.draw()
  legend, box = test_ax.get_legend().get_window_extent(), test_ax.get_window_extent()
  assert legend.y1 <= box.y0  # below the axes, off the bars


def _result():
  """RAB at two sigmas and one design: RAB at 0.5 is the envelope beyond r = 0.1 (the curve that used to hide
  under a bold envelope)."""
  def answers(name, sigma, pred, radius):
    pred, radius = np.asarray(pred), np.asarray(radius, float)
    both = {s: pred for s in SPLITS}
    rad = {s: radius for s in SPLITS}
    label = {s: np.ones(len(pred), np.int64) for s in SPLITS}
    sig = {s: np.full(len(pred), sigma or 0.3) for s in SPLITS}
    return answers_lib.Answers(name, sigma, 8, both, rad, rad, sig, label, both, 0.1, (0.25, 0.5))

  rab = [answers("RAB sigma=0.25", 0.25, [1, 1, 1, 1], [0.1] * 4), answers("RAB sigma=0.5", 0.5, [1, 1, -1, -1],
                                                                           [0.4, 0.4, 0, 0])]
  return comparison.compare(rab, [answers("design", None, [1, 1, 1, -1], [0.4, 0.4, 0.3, 0])], target_class=0)


def test_the_envelope_lies_behind_the_curves_it_bounds(saved):
  figures_lib.plot_envelope("unused.png", "title", _result())
  fig = saved[-1]
  for ax in fig.axes:
    lines = {line.get_label(): line for line in ax.get_lines()}
    band = next(line for name, line in lines.items() if name.startswith("RAB envelope"))
    for name in ("RAB sigma=0.25", "RAB sigma=0.5", "design"):
      assert lines[name].get_zorder() > band.get_zorder() and lines[name].get_linewidth() < band.get_linewidth()
    assert band.get_alpha() < 0.5  # a curve on the envelope shows through it
    assert ax.get_legend() is None  # one legend for the figure, below the panels
  assert {t.get_text() for t in fig.legends[0].get_texts()} >= {"RAB sigma=0.25", "RAB sigma=0.5", "design"}


def test_the_attack_figure_labels_its_axis_and_names_every_marker(saved):
  result = _result()
  figures_lib.plot_attack("unused.png", "title", result)
  ax = saved[-1].axes[0]
  assert ax.get_ylabel()
  entries = {t.get_text() for t in ax.get_legend().get_texts()}
  assert {"design, certified", "design, majority vote"} <= entries
  assert {"RAB at each sigma, certified answers", "RAB, majority vote (uncertified)"} <= entries
  assert sum(name.startswith(("clean accuracy", "ERA", "ASR")) for name in entries) == 3
  # every marker drawn has a legend entry of its shape and fill
  handles = {(h.get_marker(), h.get_markerfacecolor() == "none") for h in ax.get_legend().legend_handles}
  drawn = {(line.get_marker(), line.get_markerfacecolor() == "none") for line in ax.get_lines()
           if line.get_marker() not in ("None", None, "")}
  assert drawn <= handles
