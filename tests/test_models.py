"""Models of docs/method.md section 7: architecture shapes, batch norm inside the vmapped ensemble, weights on disk,
the reshape pool, and the CIFAR-10 / ImageNette configs end to end on tiny local files."""

from __future__ import annotations

import json
import os
import pickle

from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from certssb_jax.ensemble import member, sharding, trained as trained_lib, trainer as ensemble
from certssb_jax.experiment import config as config_lib, pipeline
from certssb_jax.models import layers, weights, zoo as models

# Small inputs each model allows (the ResNets are fully convolutional up to the global pool).
SHAPES = {"mnist_cnn": (28, 28, 1), "preact_resnet": (32, 32, 3), "resnet18": (32, 32, 3)}
CONV_DN = ("NHWC", "HWIO", "NHWC")
# The same classes with one block per stage (and ResNet-18 at 1/4 width): what the numeric tests below train.
# XLA:CPU takes tens of seconds to compile the full depths (mostly their random init) and runs a vmapped conv
# as a slow grouped conv; the full models train in the config tests at the end.
SHALLOW = {"mnist_cnn": {}, "preact_resnet": {"blocks_per_stage": 1},
           "resnet18": {"stage_sizes": (1, 1, 1, 1), "widths": (16, 32, 64, 128)}}


def _init(model: nn.Module, shape, seed: int = 0):
  return model.init(jax.random.key(seed), jnp.zeros((1, *shape), jnp.float32), train=False)


def _random_variables(model: nn.Module, shape, seed: int):
  """A variable tree of ``model`` with the init's structure and shapes, filled with distinct random numbers."""
  rs = np.random.RandomState(seed)
  abstract = jax.eval_shape(lambda: _init(model, shape))
  return jax.tree.map(lambda a: rs.randn(*a.shape).astype(a.dtype), abstract)


def _num_params(tree) -> int:
  return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))


def test_every_registered_model_is_covered():
  assert set(models.MODELS) == set(SHAPES)


# ---------------------------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("name", sorted(SHAPES))
@pytest.mark.parametrize("num_classes,outputs", [(2, 1), (10, 10)])
def test_output_shapes_of_binary_and_k_class_heads(name, num_classes, outputs):
  shape = SHAPES[name]
  model = models.get_model(name, num_classes)
  x = jax.ShapeDtypeStruct((3, *shape), jnp.float32)
  variables = jax.eval_shape(lambda: _init(model, shape))
  assert jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x).shape == (3, outputs)
  logits, updates = jax.eval_shape(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]), variables, x)
  assert logits.shape == (3, outputs)
  assert jax.eval_shape(models.logits_to_probs, logits).shape == (3, num_classes)
  if name == "mnist_cnn":
    assert "batch_stats" not in variables
  else:  # the BN models have running statistics, returned (same structure) by a train-mode apply
    assert jax.tree.structure(updates["batch_stats"]) == jax.tree.structure(variables["batch_stats"])


def _preact_param_count(widths=(16, 32, 64), blocks=5, outputs=1) -> int:
  """Closed form: stem conv, then per block BN (2 c_in) + conv3x3 + BN (2 c_out) + conv3x3 (+ 1x1 projection)."""
  n = 3 * 3 * 3 * widths[0]
  c_in = widths[0]
  for s, w in enumerate(widths):
    for b in range(blocks):
      n += 2 * c_in + 9 * c_in * w + 2 * w + 9 * w * w
      if c_in != w or (s > 0 and b == 0):
        n += c_in * w
      c_in = w
  return n + 2 * c_in + c_in * outputs + outputs  # final BN + head


def test_preact_resnet_architecture():
  model = models.get_model("preact_resnet", 2)
  variables = jax.eval_shape(lambda: _init(model, (32, 32, 3)))
  assert _num_params(variables["params"]) == _preact_param_count()
  blocks = [k for k in variables["params"] if k.startswith("stage")]
  assert len(blocks) == 15  # 3 stages of 5 blocks
  # projections exactly where the stride or the width changes: first block of stages 2 and 3 (stage 1 keeps 16)
  assert sorted(k for k in blocks if "proj" in variables["params"][k]) == ["stage2_block1", "stage3_block1"]
  _, inter = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((1, 32, 32, 3)), train=False,
                                                  capture_intermediates=True), variables)
  out = {k: v["__call__"][0].shape for k, v in inter["intermediates"].items() if k.startswith("stage")}
  assert out["stage1_block5"] == (1, 32, 32, 16)
  assert out["stage2_block1"] == (1, 16, 16, 32)
  assert out["stage3_block5"] == (1, 8, 8, 64)


def test_resnet18_architecture():
  """Torchvision's ResNet-18 has 11,689,512 parameters with its 1000-way head (513,000): 11,176,512 + ours."""
  model = models.get_model("resnet18", 2)
  shapes = jax.eval_shape(lambda: _init(model, (224, 224, 3)))
  assert _num_params(shapes["params"]) == 11_689_512 - 513_000 + 512 + 1
  assert shapes["params"]["stem_conv"]["kernel"].shape == (7, 7, 3, 64)
  _, inter = jax.eval_shape(lambda: model.apply(_init(model, (224, 224, 3)), jnp.zeros((1, 224, 224, 3)),
                                                train=False, capture_intermediates=True))
  out = {k: v["__call__"][0].shape for k, v in inter["intermediates"].items() if k.startswith(("stage", "stem"))}
  assert out["stem_conv"] == (1, 112, 112, 64)
  assert out["stage1_block2"] == (1, 56, 56, 64)  # after the 3x3/2 max pool
  assert out["stage2_block2"] == (1, 28, 28, 128)
  assert out["stage3_block2"] == (1, 14, 14, 256)
  assert out["stage4_block2"] == (1, 7, 7, 512)


@pytest.mark.parametrize("name", ["preact_resnet", "resnet18"])
def test_normalisation_happens_inside_the_model(name):
  """Model(x) with the data set's mean/std equals the same weights with identity constants on (x - mean) / std."""
  model = models.get_model(name, 2, **SHALLOW[name])
  identity = models.get_model(name, 2, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), **SHALLOW[name])
  variables = _random_variables(model, (32, 32, 3), 0)
  variables["batch_stats"] = jax.tree.map(np.abs, variables["batch_stats"])  # running variances > 0
  x = jax.random.uniform(jax.random.key(2), (2, 32, 32, 3))
  manual = (x - jnp.asarray(model.mean)) / jnp.asarray(model.std)
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
  apply_identity = jax.jit(lambda v, x: identity.apply(v, x, train=False))
  expected = apply_identity(variables, manual)
  np.testing.assert_allclose(apply(variables, x), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
  assert not np.allclose(apply(variables, x), apply_identity(variables, x), rtol=1e-2)


def test_bad_inputs_raise_value_errors():
  with pytest.raises(ValueError, match="channels"):
    _init(models.get_model("preact_resnet", 2), (32, 32, 1))
  with pytest.raises(ValueError, match="num_outputs"):
    _init(models.PreActResNet(num_outputs=0), (32, 32, 3))
  with pytest.raises(ValueError, match="unknown model"):
    models.get_model("resnet50", 2)


# ---------------------------------------------------------------------------------------------- ensemble + BN

N_TRAIN = 4  # one step of batch 4: the running statistics after it have a closed form


@pytest.fixture(scope="module", params=sorted(SHAPES))
def trained(request):
  """One step of a vmapped chunk of 3 models, and of each model trained alone (chunk of 1, same model id)."""
  name = request.param
  shape = SHAPES[name]
  model = models.get_model(name, 2, **SHALLOW[name])
  mesh = sharding.default_mesh(jax.devices()[:1])
  rs = np.random.RandomState(0)
  x = rs.rand(N_TRAIN, *shape).astype(np.float32)
  y = np.array([0, 1, 1, 0], np.int32)
  sigma = np.full(N_TRAIN, 0.25, np.float32)
  streams = member.Streams.ensemble(0)

  def trainer(chunk, member_map=None):
    cfg = ensemble.TrainConfig(epochs=1, batch_size=4, learning_rate=1e-3, models_per_chunk=chunk)
    return ensemble.EnsembleTrainer(model, shape, cfg, mesh=mesh, member_map=member_map)

  t3 = trainer(3, "vmap")  # explicitly vmapped (the accelerator default; CPU defaults to a loop over models)
  state = t3.train_chunk(np.arange(3), streams, x, y, sigma)
  t1 = trainer(1)
  alone = [t1.train_chunk(np.array([m]), streams, x, y, sigma) for m in range(3)]
  xb, _, _ = t3.training_batch(np.arange(3), streams, x, y, sigma, 0, 0)  # (3, 4, H, W, C) noised batches
  return dict(name=name, shape=shape, model=model, x=x, state=state, alone=alone, xb=xb, streams=streams)


def test_vmapped_step_shapes(trained):
  state, shape = trained["state"], trained["shape"]
  single = jax.eval_shape(lambda: _init(trained["model"], shape))
  for tree, ref in ((state.params, single["params"]), (state.batch_stats, single.get("batch_stats", {}))):
    flat, flat_ref = jax.tree.leaves(tree), jax.tree.leaves(ref)
    assert len(flat) == len(flat_ref)
    for a, r in zip(flat, flat_ref):
      assert a.shape == (3, *r.shape)  # leading model axis on params AND batch stats
  assert bool(state.batch_stats) == (trained["name"] != "mnist_cnn")
  assert np.isfinite(np.concatenate([np.ravel(a) for a in jax.tree.leaves(state.params)])).all()


def test_each_model_of_the_chunk_equals_that_model_trained_alone(trained):
  """Model m of the vmapped chunk = model m trained in a chunk of its own (same model id).

  Batch statistics to 1e-4. Parameters: Adam's first step moves a weight by ~lr * sign(gradient), so a weight
  whose gradient is ~0 can move differently under the two programs' rounding: every weight within 2 lr and all
  but 0.1% within 1e-4 (another model, from another init, differs by O(0.1) in almost every conv weight).
  """
  state = trained["state"]
  for m, alone in enumerate(trained["alone"]):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a[m], b[0], rtol=1e-4, atol=1e-5),
                 state.batch_stats, alone.batch_stats)
    diff = np.concatenate([np.abs(a[m] - b[0]).ravel() for a, b in
                           zip(jax.tree.leaves(state.params), jax.tree.leaves(alone.params))])
    assert diff.max() <= 2e-3 and np.mean(diff > 1e-4) < 1e-3, (m, diff.max(), np.mean(diff > 1e-4))


def _first_bn(name: str):
  """(path of the first BN in batch_stats, the stem conv's stride and padding) of a BN model."""
  if name == "preact_resnet":
    return ("stage1_block1", "bn1"), 1, ((1, 1), (1, 1))
  return ("stem_bn",), 2, ((3, 3), (3, 3))


def test_batch_norm_statistics_are_per_model(trained):
  """After one step, model m's first BN holds 0.9 * init + 0.1 * its own batch's statistics of its own stem."""
  name, model, state = trained["name"], trained["model"], trained["state"]
  if name == "mnist_cnn":
    assert not state.batch_stats
    return
  path, stride, padding = _first_bn(name)
  node = state.batch_stats
  for p in path:
    node = node[p]
  means, variances = np.asarray(node["mean"]), np.asarray(node["var"])  # (3, C)
  for i in range(3):
    for j in range(i + 1, 3):
      assert np.abs(means[i] - means[j]).max() > 1e-3  # the three models' statistics differ
  # the stem kernel model m starts from (jit prunes the other parameters' random init)
  stem_kernel = jax.jit(lambda k: model.init(k, jnp.zeros((1, *trained["shape"])), train=False)["params"]["stem_conv"]
                        ["kernel"])
  for m in range(3):
    kernel = stem_kernel(jax.random.fold_in(trained["streams"].init, m))  # model m's INIT key
    xb = (trained["xb"][m] - np.asarray(model.mean)) / np.asarray(model.std)  # (4, H, W, 3)
    feat = jax.lax.conv_general_dilated(jnp.asarray(xb), kernel, (stride, stride), padding, dimension_numbers=CONV_DN,
                                        precision="highest")
    feat = np.asarray(feat, np.float64)  # (4, H', W', C) the first BN's input
    np.testing.assert_allclose(means[m], 0.1 * feat.mean(axis=(0, 1, 2)), rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(variances[m], 0.9 + 0.1 * feat.var(axis=(0, 1, 2)), rtol=1e-3, atol=1e-5)


def test_inference_uses_running_averages(trained):
  """predict_logits: a sample's logit does not depend on the other samples of its batch (train mode does)."""
  model, state, x = trained["model"], trained["state"], trained["x"]
  other = np.random.RandomState(1).rand(*x.shape).astype(np.float32)
  mixed = np.concatenate([x[:2], other[2:]])  # the same first two samples in another batch
  a = trained_lib.predict_logits(model, state, x)  # (3, 4, 1)
  b = trained_lib.predict_logits(model, state, mixed)  # (3, 4, 1)
  assert a.shape == b.shape == (3, len(x), 1)
  np.testing.assert_allclose(a[:, :2], b[:, :2], rtol=1e-4, atol=1e-5)
  assert np.abs(a[0] - a[1]).max() > 1e-4  # models differ
  if trained["name"] != "mnist_cnn":  # the check above could fail: train-mode logits do depend on the batch
    variables = {"params": jax.tree.map(lambda v: v[0], state.params),
                 "batch_stats": jax.tree.map(lambda v: v[0], state.batch_stats)}
    train_logits = jax.jit(lambda xb: model.apply(variables, xb, train=True, mutable=["batch_stats"])[0])
    ta, tb = np.asarray(train_logits(jnp.asarray(x))), np.asarray(train_logits(jnp.asarray(mixed)))
    assert np.abs(ta[:2] - tb[:2]).max() > 1e-4


# ---------------------------------------------------------------------------------------------- weights on disk


def test_save_and_load_pretrained_round_trip_keeps_the_head(tmp_path):
  shape = (32, 32, 3)
  source = _random_variables(models.get_model("resnet18", 10), shape, 0)  # e.g. a 10-way classifier
  target = _random_variables(models.get_model("resnet18", 2), shape, 1)  # our one-logit model
  path = str(tmp_path / "resnet18.weights")
  weights.save_params(source["params"], path)
  assert os.path.isfile(path)  # written exactly there
  flat_src = traverse_util.flatten_dict(source["params"], sep="/")
  flat_tgt = traverse_util.flatten_dict(target["params"], sep="/")
  with np.load(path) as f:  # the documented format: "/"-joined keys, HWIO kernels
    assert set(f.files) == set(flat_src)
    assert f["stem_conv/kernel"].shape == (7, 7, 3, 64)
    assert f["head/kernel"].shape == (512, 10)
    np.testing.assert_array_equal(f["stage2_block1/proj_conv/kernel"], flat_src["stage2_block1/proj_conv/kernel"])
  loaded = weights.load_pretrained(target["params"], path)
  flat_new = traverse_util.flatten_dict(loaded, sep="/")
  assert set(flat_new) == set(flat_tgt)
  for k, v in flat_new.items():
    expect = flat_tgt[k] if k.startswith("head/") else flat_src[k]
    np.testing.assert_array_equal(np.asarray(v), expect, err_msg=k)
  # a same-shaped head is still excluded
  same = _random_variables(models.get_model("resnet18", 2), shape, 2)
  weights.save_params(same["params"], path)
  kept = weights.load_pretrained(target["params"], path)
  np.testing.assert_array_equal(kept["head"]["kernel"], target["params"]["head"]["kernel"])
  np.testing.assert_array_equal(kept["stem_conv"]["kernel"], same["params"]["stem_conv"]["kernel"])
  # batch statistics save and load the same way, and the loaded trees are a valid model state
  weights.save_params(source["batch_stats"], path)
  stats = weights.load_pretrained(target["batch_stats"], path)
  np.testing.assert_array_equal(stats["stem_bn"]["mean"], source["batch_stats"]["stem_bn"]["mean"])
  out = jax.eval_shape(lambda v: models.get_model("resnet18", 2).apply(v, jnp.zeros((1, *shape))),
                       {"params": loaded, "batch_stats": stats})
  assert out.shape == (1, 1)


def test_load_pretrained_errors(tmp_path):
  target = _random_variables(models.get_model("preact_resnet", 2), (32, 32, 3), 0)["params"]
  path = str(tmp_path / "w.npz")
  bad = traverse_util.flatten_dict(target, sep="/")
  bad["stage2_block1/conv1/kernel"] = np.zeros((3, 3, 16, 33), np.float32)
  np.savez(path, **bad)
  with pytest.raises(ValueError, match="stage2_block1/conv1/kernel.*shape"):
    weights.load_pretrained(target, path)
  with pytest.raises(ValueError, match="not found"):
    weights.load_pretrained(target, str(tmp_path / "missing.npz"))
  weights.save_params(_random_variables(models.get_model("mnist_cnn", 2), (28, 28, 1), 0)["params"], path)
  with pytest.raises(ValueError, match="none of its"):  # MnistCNN's Conv_0 ... match nothing of the ResNet
    weights.load_pretrained(target, path)
  with pytest.raises(ValueError, match="contains '/'"):
    weights.save_params({"a/b": np.zeros(2)}, path)
  (tmp_path / "junk.npz").write_bytes(b"not a zip")
  with pytest.raises(ValueError, match="cannot read"):
    weights.load_pretrained(target, str(tmp_path / "junk.npz"))


# ---------------------------------------------------------------------------------------------- pooling


@pytest.mark.parametrize("shape", [(2, 8, 8, 3), (1, 12, 6, 5), (3, 24, 24, 16)])
def test_max_pool_2x2_equals_nn_max_pool_values_and_gradients(shape):
  x = jax.random.normal(jax.random.key(0), shape)  # continuous: no ties, so the subgradient is unique
  w = jax.random.normal(jax.random.key(1), (shape[0], shape[1] // 2, shape[2] // 2, shape[3]))
  ref = lambda v: nn.max_pool(v, (2, 2), strides=(2, 2))  # noqa: E731
  np.testing.assert_array_equal(layers.max_pool_2x2(x), ref(x))
  g = jax.jit(jax.grad(lambda v: jnp.sum(layers.max_pool_2x2(v) * w)))(x)
  g_ref = jax.jit(jax.grad(lambda v: jnp.sum(ref(v) * w)))(x)
  np.testing.assert_array_equal(g, g_ref)
  assert np.count_nonzero(g) == w.size  # one winner per window


def test_max_pool_2x2_drops_odd_trailing_rows_like_valid_pooling():
  x = jax.random.normal(jax.random.key(3), (2, 7, 9, 2))
  np.testing.assert_array_equal(layers.max_pool_2x2(x), nn.max_pool(x, (2, 2), strides=(2, 2)))


# ---------------------------------------------------------------------------------------------- configs end to end


def _write_cifar_pickles(folder, rs) -> None:
  """The cifar-10-batches-py layout: data_batch_1..5 (10 images each) and test_batch (22), classes 0, 1, 2.

  Classes 0 (airplane) and 2 (bird) get 40 train / 20 test images in all; class 1 is there to be filtered out.
  """
  os.makedirs(folder)

  def batch(labels):
    # airplanes brighter than birds, so the task is learnable; channel-major rows of 3072 uint8
    base = np.where(np.asarray(labels)[:, None] == 0, 170, 80)
    data = np.clip(base + rs.randint(-60, 60, (len(labels), 3072)), 0, 255).astype(np.uint8)
    return {b"batch_label": b"tiny", b"labels": list(labels), b"data": data,
            b"filenames": [f"img_{i}.png".encode() for i in range(len(labels))]}

  for i in range(1, 6):
    with open(os.path.join(folder, f"data_batch_{i}"), "wb") as f:
      pickle.dump(batch([0, 2, 1, 0, 2, 0, 2, 1, 0, 2]), f)  # 4 airplanes, 4 birds, 2 others
  with open(os.path.join(folder, "test_batch"), "wb") as f:
    pickle.dump(batch([0, 2] * 10 + [1, 1]), f)


def _check_run(workdir, summary, n_train, n_test, num_models, input_shape):
  on_disk = json.load(open(os.path.join(workdir, "summary.json")))
  assert on_disk["n_train"] == summary["n_train"] == n_train
  assert on_disk["n_test"] == n_test and on_disk["num_models"] == num_models
  votes = np.load(os.path.join(workdir, "votes.npz"))
  assert votes["clean"].shape == (n_test, 2)
  assert np.all(votes["clean"].sum(axis=1) == num_models)
  assert votes["triggered"].shape == (on_disk["n_triggered"], 2)
  sig = np.load(os.path.join(workdir, "sigmas.npz"))
  assert sig["train"].shape == (n_train,) and sig["test_clean"].shape == (n_test,)
  store = np.load(os.path.join(workdir, "store.npz"))
  assert all(store[k].shape[1:] == input_shape for k in store.files if store[k].ndim == 4)
  return on_disk, sig


@pytest.mark.slow
def test_cifar_quick_config_runs(tmp_path):
  folder = str(tmp_path / "cifar-10-batches-py")
  _write_cifar_pickles(folder, np.random.RandomState(0))
  # sample-specific sigmas searched for training and test (pilot model + searches); the undefended baseline
  # runs in the ImageNette test
  c = config_lib.load_config(f"configs/cifar10.py:quick,data_dir={folder},defense=cert_ssb,"
                             "poison_rate=0.1,train_sigma=search,undefended.enabled=false")
  assert c.model.name == "preact_resnet" and c.data.name == "cifar10" and tuple(c.data.classes) == (2, 0)
  workdir = str(tmp_path / "run")
  summary = pipeline.run(c, workdir)
  on_disk, sig = _check_run(workdir, summary, 40, 20, c.train.num_models, (32, 32, 3))
  assert on_disk["dataset"] == "cifar10" and on_disk["n_poisoned"] == 4  # round(0.1 * 40 training images)
  lo, hi = c.sigma.sigma_0, c.sigma.sigma_0 * 1.5
  assert np.all((sig["train"] >= lo - 1e-6) & (sig["train"] <= hi + 1e-6))


@pytest.mark.slow
def test_imagenette_quick_config_runs(tmp_path):
  rs = np.random.RandomState(0)
  root = tmp_path / "imagenette"
  # three WordNet-id class dirs; classes (0, 1) keep the first two in sorted order (tench, English springer)
  for split, per_class in (("train", 12), ("val", 6)):
    for k, wnid in enumerate(("n01440764", "n02102040", "n02979186")):
      d = root / split / wnid
      d.mkdir(parents=True)
      for i in range(per_class if k < 2 else 2):
        img = np.clip(60 + 100 * k + rs.randint(-50, 50, (40, 48, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(d / f"{i:03d}.png")
  c = config_lib.load_config(f"configs/imagenette.py:quick,data_dir={root},poison_rate=0.1,defense=rab")
  assert c.model.name == "resnet18" and c.data.name == "imagenette" and c.data.image_size == 32
  workdir = str(tmp_path / "run")
  summary = pipeline.run(c, workdir)
  on_disk, sig = _check_run(workdir, summary, 24, 12, c.train.num_models, (32, 32, 3))
  assert on_disk["defense"]["name"] == "rab"
  np.testing.assert_array_equal(sig["train"], np.full(24, c.sigma.sigma_0, np.float32))


def test_paper_defaults_of_the_configs():
  c = config_lib.load_config("configs/cifar10.py")
  assert (c.data.source, c.data.name, tuple(c.data.classes), c.model.name) == ("cifar_pickle", "cifar10", (2, 0),
                                                                               "preact_resnet")
  assert (c.train.learning_rate, c.train.batch_size, c.train.epochs, c.train.num_models) == (1e-3, 64, 10, 1000)
  assert (c.sigma.sigma_0, c.attack.poison_rate, c.attack.delta, c.attack.target_class) == (0.25, 0.02, 1.0, 0)
  c = config_lib.load_config("configs/imagenette.py:sigma_0=0.5,trigger=fourpixel")
  assert (c.data.source, c.data.name, tuple(c.data.classes), c.data.image_size, c.model.name) == (
      "image_folder", "imagenette", (0, 1), 224, "resnet18")
  assert (c.train.learning_rate, c.train.batch_size, c.train.epochs, c.train.num_models) == (1e-4, 32, 5, 200)
  assert c.sigma.sigma_0 == 0.5 and c.attack.trigger == "fourpixel"
  with pytest.raises(ValueError, match="unknown config field"):
    config_lib.load_config("configs/cifar10.py:no_such_field=1")
