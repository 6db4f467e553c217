"""``python -m certssb_jax.envelope``: the command line lives in program.py."""

from certssb_jax.envelope import program
from certssb_jax.run import cli

if __name__ == "__main__":  # flags are defined once, by the program that runs
  program.define_flags()
  cli.run(program.main)
