r"""Full-size real data on a CPU or one accelerator: Fashion-MNIST, T-shirt (y=0, the target) vs Trouser (y=1).

The paper's MNIST protocol (CNN, Adam 1e-3, batch 128, 20 epochs, one-pixel trigger of l2 norm 1, 2% of the
training set poisoned, alpha 0.001) on the 12,000 / 2,000 images of a Fashion-MNIST class pair. Get the data
once, either from Debian or from the original host (checksums verified):

  sudo apt-get install dataset-fashion-mnist        # /usr/share/datasets/fashion-mnist, found by default
  python -m certssb_jax.data fetch fashion_mnist    # or: ~/.cache/certssb_jax/data/fashion_mnist

then (M = 16 takes about 8 minutes for RAB on a 2-core CPU; the paper's M = 1000 wants an accelerator):

  python -m certssb_jax.launch --config configs/fashion_mnist.py:num_models=16 --workdir runs/fm
  python -m certssb_jax.launch --config configs/fashion_mnist.py:num_models=16,classes=7+9 --workdir runs/fm79
  python -m certssb_jax.launch --config configs/fashion_mnist.py:num_models=16 --workdir runs/fm2 --compare rab,cert_ssb
  python -m certssb_jax.studies sweep --config configs/fashion_mnist.py:num_models=16 --triggers onepixel,fourpixel \
      --sigmas 0.25 --workdir runs/sweep_fm

Variants (comma-separated key=value): classes (two class ids joined by +, the first is the target: 0 T-shirt,
1 Trouser, 2 Pullover, 3 Dress, 4 Coat, 5 Sandal, 6 Shirt, 7 Sneaker, 8 Bag, 9 Ankle boot), trigger, sigma_0,
defense (cert_ssb | rab | dpa | ...), num_models, and every short name of certssb_jax/experiment/config.py; `quick`: 400 /
100 images, 16 models, one epoch (the CI smoke test).
"""

from certssb_jax.experiment import config as config_lib


def get_config(arg: str | None = None):
  c = config_lib.base_config()
  c.data.source = "idx"  # the four IDX files
  c.data.name = "fashion_mnist"  # default folder: Debian's, else that of `python -m certssb_jax.data fetch`
  c.data.data_dir = ""  # "": the default folder
  c.data.classes = (0, 1)  # T-shirt -> y=0 (the attacker's target), Trouser -> y=1
  c.train.num_models = 1000  # the paper's M; pass num_models=16 (or more) on a CPU
  c.train.epochs = 20
  c.train.batch_size = 128
  c.train.learning_rate = 1e-3
  c.defense.name = "cert_ssb"  # Cert-SSB; defense=rab gives RAB
  c.sigma.sigma_0 = 0.25
  variant = config_lib.parse_variant(arg)
  if variant.pop("quick", None):
    c.data.max_train = 400
    c.data.max_test = 100
    c.train.batch_size = 32  # a dozen steps per epoch even on 400 images
    config_lib.make_quick(c, num_models=16)
  return config_lib.apply_overrides(c, variant)
