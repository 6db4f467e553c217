r"""The paper's MNIST protocol (docs/method.md section 7): digit 1 (y=1) vs digit 0 (y=0, the target), M = 1000.

CNN, Adam 1e-3, batch 128, 20 epochs; 12,665 train / 2,115 test images. Get the data once (the four IDX files,
checksums verified, into the default folder `data_dir=""` reads: $CERTSSB_JAX_DATA/mnist or
~/.cache/certssb_jax/data/mnist):

  python -m certssb_jax.data fetch mnist

then:

  python -m certssb_jax.launch --config configs/mnist.py --workdir runs/mnist_onepixel_0.25
  python -m certssb_jax.launch --config configs/mnist.py:trigger=fourpixel,sigma_0=0.5 --workdir runs/mnist_4px
  python -m certssb_jax.launch --config configs/mnist.py:defense=cert_ssb --workdir runs/mnist_ssb
  python -m certssb_jax.launch --config configs/mnist.py:data_dir=/data/mnist --workdir runs/mnist_idx   # own folder
  python -m certssb_jax.launch --config configs/mnist.py:source=tfds --workdir runs/mnist_tfds   # prepared tfds
  python -m certssb_jax.launch --config configs/mnist.py:quick --workdir /tmp/mnist_quick   # smoke test

Variants (comma-separated key=value): trigger (onepixel|fourpixel|blending), sigma_0 (0.12|0.25|0.5|1.0 in
the paper), defense (rab|cert_ssb|dpa|...), num_models, epochs, batch_size, bound
(clopper_pearson|hoeffding), alpha, poison_rate, delta, seed, source (idx|tfds|builtin), data_dir, max_train,
max_test; `quick`: the built-in digits (no download), 16 models, 1 epoch. Fashion-MNIST: `python -m
certssb_jax.data fetch fashion_mnist` (or `sudo apt-get install dataset-fashion-mnist`), then
`--config configs/mnist.py:data.name=fashion_mnist`.
"""

from certssb_jax.experiment import config as config_lib


def get_config(arg: str | None = None):
  c = config_lib.base_config()
  c.data.source = "idx"  # idx (the fetched IDX files) | tfds (prepared mnist) | builtin
  c.data.name = "mnist"  # also picks the default folder of `python -m certssb_jax.data fetch mnist`
  c.data.data_dir = ""  # "": that default folder
  c.data.classes = (0, 1)
  c.train.num_models = 1000
  c.train.epochs = 20
  c.train.batch_size = 128
  c.train.learning_rate = 1e-3
  c.sigma.sigma_0 = 0.25
  variant = config_lib.parse_variant(arg)
  if variant.pop("quick", None):  # CI-sized: built-in data, few models, one epoch
    c.data.source = "builtin"
    config_lib.make_quick(c, num_models=16)  # the fewest that certify anything at alpha = 0.001 is 11
  return config_lib.apply_overrides(c, variant)
