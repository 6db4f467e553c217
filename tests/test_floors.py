"""The package's floors: no module imports one above its own floor (docs/design.md, "Where things live")."""

import ast
import os

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "certssb_jax")
FLOORS = {"rng": 0, "backend": 0, "multihost": 0, "files": 0, "progress": 0, "checks": 0, "data": 1, "models": 1,
          "ensemble": 2, "certify": 3, "store": 3, "defenses": 4, "experiment": 5, "launch": 6, "sweep": 6, "envelope": 6,
          "families": 6, "count_study": 6, "studies": 6, "apidoc": 6}


def _modules():
  for folder, _, names in os.walk(PACKAGE):
    for name in names:
      if name.endswith(".py"):
        rel = os.path.relpath(os.path.join(folder, name), PACKAGE)
        if rel != "__init__.py":  # the package's front door re-exports the public API of every floor
          yield rel


def _floor_of(dotted: str) -> int:
  head = dotted.split(".")[1] if dotted.startswith("certssb_jax.") else dotted
  return FLOORS[head]


def _imports(path: str):
  tree = ast.parse(open(path).read())
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("certssb_jax"):
      if node.module == "certssb_jax":
        yield from (f"certssb_jax.{a.name}" for a in node.names)
      else:
        yield node.module
    elif isinstance(node, ast.Import):
      yield from (a.name for a in node.names if a.name.startswith("certssb_jax."))


@pytest.mark.parametrize("rel", sorted(_modules()))
def test_no_module_imports_a_higher_floor(rel):
  own = FLOORS[rel.split(os.sep)[0].removesuffix(".py")]
  above = [m for m in _imports(os.path.join(PACKAGE, rel)) if _floor_of(m) > own]
  assert not above, f"{rel} (floor {own}) imports {above}"


def test_every_module_has_a_floor():
  assert {rel.split(os.sep)[0].removesuffix(".py") for rel in _modules()} == set(FLOORS)
