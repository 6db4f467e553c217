"""A user's own data in one call: numpy arrays through ``pipeline.run_arrays`` give the same run as the same images
read by a built-in source, and a folder of images runs from the command line."""

import os

from conftest import tiny_config  # pylint: disable=g-bad-import-order
import helpers
import numpy as np
import pytest

from certssb_jax.data import readers
from certssb_jax.experiment import pipeline


def test_arrays_give_the_run_of_the_same_images_from_a_source(tmp_path):
  c = tiny_config(**{"sigma.sigma_hi": None, "undefended.enabled": False, "train.num_models": 4})
  ds = pipeline.load_data(pipeline.config_lib.resolve(c))
  builtin = pipeline.run(c, str(tmp_path / "builtin"))
  # the user's labels are other class ids (3 and 7), and the images come as uint8
  ids = np.array([3, 7])
  c_own = tiny_config(**{"sigma.sigma_hi": None, "undefended.enabled": False, "train.num_models": 4,
                         "data.classes": "3+7"})
  own = pipeline.run_arrays(c_own, str(tmp_path / "own"), np.round(ds.x_train * 255).astype(np.uint8),
                            ids[ds.y_train], ds.x_test, ids[ds.y_test], name="digits")
  assert own["dataset"] == "digits" and own["classes"] == [3, 7]
  a, b = np.load(tmp_path / "builtin" / "votes.npz"), np.load(tmp_path / "own" / "votes.npz")
  for key in ("clean_preds", "triggered_preds"):
    np.testing.assert_array_equal(a[key], b[key])  # the builtin pixels are k / 255, so uint8 loses nothing
  assert own["metrics"] == builtin["metrics"]
  # a resumed run with other arrays is refused (the file of the data is part of the config)
  with pytest.raises(ValueError, match="holds a run with another config"):
    pipeline.run_arrays(c_own, str(tmp_path / "own"), ds.x_train[::-1], ids[ds.y_train[::-1]], ds.x_test,
                        ids[ds.y_test])


def test_npz_data_errors_name_the_problem(tmp_path):
  path = str(tmp_path / "d.npz")
  np.savez(path, x_train=np.zeros((4, 8, 8)), y_train=np.zeros(4))
  with pytest.raises(ValueError, match=r"lacks the array\(s\) \['x_test', 'y_test'\]"):
    readers.load_npz(path, (0, 1))
  readers.save_npz_data(path, np.full((4, 8, 8), 2.0), np.array([0, 1, 0, 1]), np.zeros((2, 8, 8)), np.array([0, 1]))
  with pytest.raises(ValueError, match=r"\[0, 1\]"):  # float images off the pixel scale
    readers.load_npz(path, (0, 1))


@pytest.mark.slow
def test_a_folder_of_images_runs_from_the_command_line(tmp_path):
  """The README's own-data command on a folder tree of PNG files (two classes of real digits)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  ds = readers.load_builtin_mnist((0, 1))
  root = tmp_path / "digits"
  for split, x, y, n in (("train", ds.x_train, ds.y_train, 96), ("val", ds.x_test, ds.y_test, 24)):
    for cls in (0, 1):
      folder = root / split / f"digit{cls}"
      folder.mkdir(parents=True)
      for i, j in enumerate(np.flatnonzero(y == cls)[:n]):
        Image.fromarray(np.round(x[j, :, :, 0] * 255).astype(np.uint8)).save(folder / f"{i:04d}.png")
  out = helpers.launch("--config", "configs/quickstart.py:quick,num_models=16", "--config.data.source=image_folder",
                       f"--config.data.data_dir={root}", "--config.data.name=digits", "--config.model.name=mnist_cnn",
                       "--config.train.batch_size=32", "--workdir", str(tmp_path / "w"))
  stdout = helpers.check(out, "own folder")
  assert "clean accuracy" in stdout and os.path.exists(tmp_path / "w" / "summary.json")
