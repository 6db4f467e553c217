"""Subprocess helpers shared by the tests that start JAX in a fresh process (device counts are fixed when jax
starts) or run the command-line programs as a user does."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")
TIMEOUT_S = 240


def env(num_devices: int = 1, nproc: int | None = None, **extra: str) -> dict[str, str]:
  """The environment of a child process on ``num_devices`` CPU devices.

  ``nproc`` sets ``PJRT_NPROC``: XLA:CPU sizes its intra-op thread pool as max(#cores, #devices), and the
  partitioning of the input-gradient convolution depends on the pool size, so processes that must agree bit for
  bit need the same value.
  """
  out = dict(os.environ)
  out.update(JAX_NUM_CPU_DEVICES=str(num_devices), JAX_PLATFORMS="cpu", **extra)
  flags = [f for f in out.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
  if num_devices > 1:
    flags.append(f"--xla_force_host_platform_device_count={num_devices}")
  out["XLA_FLAGS"] = " ".join(flags)
  if nproc is not None:
    out["PJRT_NPROC"] = str(nproc)
  out["PYTHONPATH"] = os.pathsep.join([ROOT, TESTS, out.get("PYTHONPATH", "")])
  return out


def run_module(module: str, *args: str, environ: dict[str, str] | None = None,
               timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess:
  """``python -m module args`` from the repository root; returns the finished process (text output)."""
  return subprocess.run([sys.executable, "-m", module, *args], env=environ or env(), cwd=ROOT, capture_output=True,
                        text=True, timeout=timeout)


def start_module(module: str, *args: str, environ: dict[str, str] | None = None, **kwargs) -> subprocess.Popen:
  """The same, started in the background."""
  return subprocess.Popen([sys.executable, "-m", module, *args], env=environ or env(), cwd=ROOT, text=True,
                          **kwargs)


def launch(*args: str, environ: dict[str, str] | None = None,
           timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess:
  """``python -m certssb_jax.launch ... --noprogress``."""
  return run_module("certssb_jax.launch", *args, "--noprogress", environ=environ, timeout=timeout)


def check(proc: subprocess.CompletedProcess, what: str = "child") -> str:
  """The stdout of a process that must have succeeded (else its stderr in the failure message)."""
  assert proc.returncode == 0, f"{what} failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}"
  return proc.stdout
