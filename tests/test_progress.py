"""Progress that suits where it goes: a logged line every tenth of the work where no one watches a terminal."""

import logging

from certssb_jax import progress


def test_log_progress_logs_a_line_every_tenth_and_one_at_the_end(caplog):
  with caplog.at_level(logging.INFO, logger="certssb_jax.progress"):
    with progress.log_progress("train", 1000, "step") as update:
      for _ in range(1000):
        update(1)
  lines = [r.getMessage() for r in caplog.records]
  assert len(lines) == 10, lines  # 10%, 20%, ..., 90% and the end
  assert lines[0].startswith("train: 10% (100 of 1000 steps") and lines[-1].startswith("train: 1000 steps in")
  assert all("\r" not in line for line in lines)


def test_no_terminal_means_logged_lines(monkeypatch):
  monkeypatch.setattr("sys.stderr.isatty", lambda: False)
  monkeypatch.delitem(__import__("sys").modules, "ipykernel", raising=False)
  assert progress.default_progress() is progress.log_progress
  assert progress.default_progress(primary=False) is progress.no_progress
  monkeypatch.setattr("sys.stderr.isatty", lambda: True)
  assert progress.default_progress() is progress.tqdm_progress
