r"""The count family's 10-class benchmark: all of Fashion-MNIST (60,000 / 10,000 images, ten classes), a clean
training set (no attack: certified accuracy against poisoned samples, as the DPA, Finite Aggregation and Run-off
Election papers report it), members trained 10 epochs with batch 32 on their views.

  python -m certssb_jax.studies counts --config configs/fashion_mnist10.py --workdir runs/count10 --ks 50,250 \
      --spread 2 --fa_ks 50,250 --results_md docs/count_family.md

or one run: python -m certssb_jax.launch --config configs/fashion_mnist10.py:num_models=50 --workdir runs/c10

Variants (comma-separated key=value): num_models (k, or k x d for Finite Aggregation), and every short name of
certssb_jax/experiment/config.py; `quick`: 2,000 / 500 images and 10 members (a smoke test).
"""

from certssb_jax.experiment import config as config_lib


def get_config(arg: str | None = None):
  c = config_lib.base_config()
  c.data.source = "idx"
  c.data.name = "fashion_mnist"
  c.data.data_dir = ""
  c.data.classes = tuple(range(10))
  c.attack.poison_rate = 0.0  # the clean training set: what the count family's tables certify
  c.defense.name = "dpa_roe"
  c.defense.member_batch_size = 32
  c.train.num_models = 50
  c.train.epochs = 10
  c.undefended.enabled = False
  variant = config_lib.parse_variant(arg)
  if variant.pop("quick", None):
    c.data.max_train = 2000
    c.data.max_test = 500
    c.train.num_models = 10
  return config_lib.apply_overrides(c, variant)
