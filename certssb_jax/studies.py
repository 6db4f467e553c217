r"""``python -m certssb_jax.studies STUDY``: the studies of many runs, in one command line and one flag dialect.

  sweep      RAB and Cert-SSB over configs x triggers x sigma_0: a table and CRA curves (``sweep``)
  envelope   every Cert-SSB design against RAB's envelope over a grid of sigma (``envelope``)
  families   every defense family at equal ensemble sizes, each at its best setting (``families``)
  counts     DPA, Finite Aggregation and their run-off elections on one data set (``count_study``)

Every study takes ``--config FILE[:variant]`` (repeated for more configs where the study compares them),
``--workdir`` (the folder of its runs: a finished run is reused, an interrupted one resumes), ``--results_md``
(the page it writes, with its figures beside it in ``figures/``) and ``--noprogress``; its grid flags take
comma-separated values. ``python -m certssb_jax.studies STUDY --help`` lists them.

  python -m certssb_jax.studies sweep --config configs/quickstart.py:quick,num_models=16 --workdir /tmp/sweep_q
  python -m certssb_jax.studies envelope --config configs/quickstart.py:quick --sigmas 0.25,0.5 --workdir /tmp/env_q
"""

from __future__ import annotations

import importlib
import sys

from absl import flags

from certssb_jax.checks import did_you_mean
from certssb_jax.experiment import cli

# study -> the module that runs it (its ``define_flags`` and ``main``)
STUDIES = {"sweep": "certssb_jax.sweep", "envelope": "certssb_jax.envelope.program",
           "families": "certssb_jax.families", "counts": "certssb_jax.count_study"}


def define_common_flags() -> None:
  """The flags every study takes."""
  flags.DEFINE_multi_string("config", None, "Config file with optional :variant; repeat it for more configs where "
                                            "the study compares them (sweep, envelope).")
  flags.DEFINE_string("workdir", None, "Folder of every run of the study.")
  flags.DEFINE_string("results_md", None, "Also write the study's page here (its figures go to figures/ beside it).")
  flags.DEFINE_bool("progress", True, "Show progress.")


def main(argv: list[str] | None = None) -> None:
  argv = list(sys.argv if argv is None else argv)
  name = argv[1] if len(argv) > 1 else ""
  if name not in STUDIES:
    cli.fail(f"name a study first: python -m certssb_jax.studies {{{','.join(STUDIES)}}} --config ... --workdir ..."
             + (f"; {name!r} is not one{did_you_mean(name, list(STUDIES))}" if name else ""))
  study = importlib.import_module(STUDIES[name])
  define_common_flags()
  study.define_flags()
  cli.run(study.main, argv=[f"{argv[0]} {name}", *argv[2:]])


if __name__ == "__main__":
  main()
