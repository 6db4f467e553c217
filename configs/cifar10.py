r"""The paper's CIFAR-10 protocol (docs/method.md section 7): airplane (y=1) vs bird (y=0, the target), M = 1000.

Pre-activation ResNet (widths 16/32/64, 3 stages of 5 blocks, batch norm, one logit), Adam 1e-3, batch 64,
10 epochs; the two classes give 10,000 train / 2,000 test images. Get the data once (the CIFAR-10 python
release, checksum verified, extracted to cifar-10-batches-py in the default folder `data_dir=""` reads:
$CERTSSB_JAX_DATA/cifar10 or ~/.cache/certssb_jax/data/cifar10):

  python -m certssb_jax.data fetch cifar10

then:

  python -m certssb_jax.launch --config configs/cifar10.py --workdir runs/cifar10_onepixel_0.25
  python -m certssb_jax.launch --config configs/cifar10.py:sigma_0=0.5,trigger=fourpixel --workdir runs/cifar10_4px
  python -m certssb_jax.launch --config configs/cifar10.py:defense=cert_ssb --workdir runs/cifar10_ssb
  python -m certssb_jax.launch --config configs/cifar10.py:data_dir=/data/cifar-10-batches-py --workdir runs/cifar10_own
  python -m certssb_jax.launch --config configs/cifar10.py:source=tfds --workdir runs/cifar10_tfds   # prepared tfds
  python -m certssb_jax.launch --config configs/cifar10.py:quick --workdir /tmp/cifar10_quick   # smoke test

Variants (comma-separated key=value): trigger (onepixel|fourpixel|blending), sigma_0 (0.12|0.25|0.5|1.0 in the
paper), defense (rab|cert_ssb|dpa|...), num_models, epochs, batch_size, learning_rate, bound
(clopper_pearson|hoeffding), alpha, poison_rate, delta, seed, source (cifar_pickle|tfds), data_dir, max_train,
max_test, any dotted field (train.models_per_chunk=64); `quick`: 4 models, 1 epoch, at most 200 / 50 images,
same data source (its CI test passes `source=cifar_pickle,data_dir=...` with tiny local pickles).
"""

from __future__ import annotations

from certssb_jax.experiment import config as config_lib


def get_config(arg: str | None = None):
  c = config_lib.base_config()
  c.data.source = "cifar_pickle"  # cifar_pickle (the fetched python release) | tfds (prepared cifar10)
  c.data.name = "cifar10"  # tfds name, the data set's name in the outputs, and its default folder
  c.data.data_dir = ""  # "": the default folder of `python -m certssb_jax.data fetch cifar10`
  c.data.classes = (2, 0)  # original ids: bird (2) -> y=0 (the target), airplane (0) -> y=1
  c.data.image_size = None  # keep the native 32x32
  c.data.max_train = None  # all: 5,000 airplanes + 5,000 birds = 10,000
  c.data.max_test = None  # all: 1,000 + 1,000 = 2,000
  c.attack.trigger = "onepixel"  # (15, 15) in every channel += delta / sqrt(3)
  c.attack.poison_rate = 0.02  # of the non-target (airplane) training images
  c.attack.delta = 1.0  # l2 norm of the trigger
  c.attack.target_class = 0  # bird
  c.model.name = "preact_resnet"  # pre-activation ResNet-32: widths 16/32/64, 3 x 5 blocks, batch norm
  c.train.num_models = 1000  # M
  c.train.epochs = 10
  c.train.batch_size = 64
  c.train.learning_rate = 1e-3  # Adam
  # models per vmapped training step: 32 x 64 images (an estimate of ~20 GB of activations; the auto value, up to
  # 256 models, would need ~8x that); 0: auto (1 on CPU)
  c.train.models_per_chunk = 32
  c.sigma.sigma_0 = 0.25  # the paper's grid: 0.12, 0.25, 0.5, 1.0
  variant = config_lib.parse_variant(arg)
  if variant.pop("quick", None):  # CI-sized: a few models, one epoch, tiny data (same source)
    c.data.max_train = 200  # first 100 of each class
    c.data.max_test = 50
    config_lib.make_quick(c, num_models=4)
    c.train.models_per_chunk = None  # auto: all 4 on an accelerator, 1 on CPU
    c.train.batch_size = 8  # several steps even on tiny data
    c.sigma.batch_size = 32  # the search pads every batch to this size: keep it near the data size
  return config_lib.apply_overrides(c, variant)
