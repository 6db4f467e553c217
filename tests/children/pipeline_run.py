"""Child process: one tiny pipeline run (``python -m children.pipeline_run WORKDIR OVERRIDES_JSON``); prints the
number of devices it saw."""

import json
import sys

from conftest import tiny_config
import jax

from certssb_jax.experiment import pipeline


def main() -> None:
  workdir, overrides = sys.argv[1], json.loads(sys.argv[2])
  pipeline.run(tiny_config(**overrides), workdir)
  print(json.dumps({"devices": len(jax.devices())}))


if __name__ == "__main__":
  main()
