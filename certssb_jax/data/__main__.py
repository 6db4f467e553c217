"""`python -m certssb_jax.data fetch NAME`: the command line lives in fetch.py."""

import sys

from certssb_jax.data import fetch

sys.exit(fetch.main(sys.argv[1:]))
