"""docs/api.md is what ``python -m certssb_jax.apidoc`` writes from the public names' docstrings today."""

import os

from certssb_jax import apidoc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_api_page_is_current():
  with open(os.path.join(ROOT, "docs", "api.md")) as f:
    assert f.read() == apidoc.page(), "run: python -m certssb_jax.apidoc --out docs/api.md"
