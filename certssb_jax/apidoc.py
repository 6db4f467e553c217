"""Writes docs/api.md, the reference of the package's public names (``certssb_jax.__all__``), from their signatures
and docstrings: ``python -m certssb_jax.apidoc --out docs/api.md``."""

from __future__ import annotations

import inspect
import re

from absl import flags

import certssb_jax
from certssb_jax import files
from certssb_jax.experiment import cli


def page() -> str:
  """The markdown page: one section per public name, its signature and its whole docstring."""
  lines = ["# API reference", "",
           "Written by `python -m certssb_jax.apidoc --out docs/api.md` from the docstrings of the names "
           "`certssb_jax` exports; do not edit by hand. Every other module is importable too (the layers are in "
           "docs/design.md); these are the names meant for users.", ""]
  for name in sorted(certssb_jax.__all__, key=str.lower):
    obj = getattr(certssb_jax, name)
    try:
      signature = re.sub(r" at 0x[0-9a-f]+", "", f"{name}{inspect.signature(obj)}")  # defaults' addresses vary
    except (TypeError, ValueError):
      signature = name
    kind = "class" if inspect.isclass(obj) else "function"
    lines += [f"## `{name}`", "", f"{kind} in `{obj.__module__}`", "", "```python", signature, "```", "",
              inspect.cleandoc(obj.__doc__ or "(no docstring)"), ""]
  return "\n".join(lines)


def main() -> None:
  out = flags.FLAGS.out
  cli.require(out=out)
  files.atomic_write_bytes(out, page().encode())
  print(f"wrote {out}")


if __name__ == "__main__":
  flags.DEFINE_string("out", None, "Where to write the page (docs/api.md).")
  cli.run(main)
