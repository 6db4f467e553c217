"""Defenses as values: each factory's record resolves to the config it names, the registry looks them up by key, and
the records answer what the run asks (noise plan, training identity) without the run naming a defense."""

import pytest

import certssb_jax as cj
from certssb_jax import defenses
from certssb_jax.experiment import config as config_lib, identity


def _resolved(defense):
  return config_lib.resolve(config_lib.with_defense(config_lib.load_config("configs/quickstart.py"), defense))


@pytest.mark.parametrize("defense,key,fields", [
    (cj.rab(0.5), "rab", {"sigma.sigma_0": 0.5, "sigma.sigma_hi": None, "sigma.train": None}),
    (cj.cert_ssb(0.25, sigma_hi=0.375), "cert_ssb", {"sigma.sigma_0": 0.25, "sigma.sigma_hi": 0.375}),
    (cj.dpa(16, partition="position"), "dpa", {"train.num_models": 16, "defense.partition": "position"}),
    (cj.bagging(12, 20), "bagging", {"train.num_models": 12, "defense.bag_size": 20}),
    (cj.finite_aggregation(8, 2), "finite_aggregation", {"train.num_models": 16, "defense.spread": 2}),
    (cj.dpa_smoothing(8, 1.0, 100), "dpa_smoothing", {"train.num_models": 8, "sigma.sigma_0": 1.0,
                                                      "certify.draws": 100}),
    (cj.run_off(cj.finite_aggregation(8, 2)), "fa_roe", {"train.num_models": 16, "defense.spread": 2}),
])
def test_a_factorys_value_resolves_to_the_config_it_names(defense, key, fields):
  cfg = _resolved(defense)
  assert cfg.defense.name == key and defenses.get(cfg) is defenses.REGISTRY[key] and defense.key == key
  for path, value in fields.items():
    section, name = path.split(".")
    assert cfg[section][name] == value, path


def test_every_registered_defense_has_its_own_key_and_name():
  assert list(defenses.REGISTRY) == list(defenses.NAMES)
  assert all(d.key == k for k, d in defenses.REGISTRY.items())
  assert len({d.name for d in defenses.REGISTRY.values()}) == len(defenses.REGISTRY)
  with pytest.raises(ValueError, match="run-off election runs on the members of"):
    cj.run_off(cj.bagging(4))


def test_the_noise_plan_says_what_the_smoothing_stages_run():
  assert defenses.noise_plan(_resolved(cj.rab(0.25))) == defenses.NoisePlan()
  assert defenses.noise_plan(_resolved(cj.cert_ssb(0.25))) == defenses.NoisePlan()  # the range [sigma_0, sigma_0]
  assert defenses.noise_plan(_resolved(cj.cert_ssb(0.25, sigma_hi=0.375))) == defenses.NoisePlan(
      search_train=False, search_test=True, pilot=True)
  assert defenses.noise_plan(_resolved(cj.cert_ssb(0.25, sigma_hi=0.375, train="search", scorer="ensemble"))) == \
      defenses.NoisePlan(search_train=True, search_test=True, pilot=True)
  assert defenses.noise_plan(_resolved(cj.cert_ssb(0.25, sigma_hi=0.375, scorer="ensemble"))).pilot is False


def test_training_identities_share_models_exactly_where_the_members_are_the_same():
  key = lambda d: identity.training_key(config_lib.to_json(_resolved(d)))
  assert key(cj.rab(0.25)) == key(cj.cert_ssb(0.25)) == key(cj.cert_ssb(0.25, sigma_hi=0.375))
  assert key(cj.rab(0.25)) != key(cj.rab(0.5)) and key(cj.rab(0.25)) != key(cj.cert_ssb(0.25, train="search"))
  assert key(cj.dpa(8)) == key(cj.run_off(cj.dpa(8))) != key(cj.dpa(16))
  assert key(cj.finite_aggregation(8, 2)) == key(cj.run_off(cj.finite_aggregation(8, 2))) != key(cj.dpa(16))
  assert key(cj.dpa(8)) != key(cj.dpa_smoothing(8, 1.0))  # its members train with noise
