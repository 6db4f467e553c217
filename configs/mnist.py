r"""The paper's MNIST protocol (METHOD.md section 7): digit 1 (y=1) vs digit 0 (y=0, the target), M = 1000.

Full MNIST through tensorflow-datasets (prepare it once where there is network: `tfds build mnist` or
`python -c "import tensorflow_datasets as tfds; tfds.data_source('mnist')"`), or MNIST IDX files with
`source=idx,data_dir=/path/to/mnist`. CNN, Adam 1e-3, batch 128, 20 epochs; 12,665 train / 2,115 test images.

  python -m certssb_jax.launch --config configs/mnist.py --workdir runs/mnist_onepixel_0.25
  python -m certssb_jax.launch --config configs/mnist.py:trigger=fourpixel,sigma_0=0.5 --workdir runs/mnist_4px
  python -m certssb_jax.launch --config configs/mnist.py:sigma_mode=sample_specific --workdir runs/mnist_ssb
  python -m certssb_jax.launch --config configs/mnist.py:source=idx,data_dir=/data/mnist --workdir runs/mnist_idx
  python -m certssb_jax.launch --config configs/mnist.py:quick --workdir /tmp/mnist_quick   # smoke test

Variants (comma-separated key=value): trigger (onepixel|fourpixel|blending), sigma_0 (0.12|0.25|0.5|1.0 in
the paper), sigma_mode (fixed|sample_specific), num_models, epochs, batch_size, bound
(clopper_pearson|hoeffding), alpha, poison_rate, delta, seed, source, data_dir, max_train, max_test; `quick`.
"""

from certssb_jax import config as config_lib


def get_config(arg: str | None = None):
  c = config_lib.base_config()
  c.data.source = "tfds"
  c.data.name = "mnist"
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
