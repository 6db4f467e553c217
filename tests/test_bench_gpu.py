"""benchmarks/bench_gpu.py: the peak table, the FLOP count, and its sections at toy sizes on the CPU."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import pytest

from benchmarks import bench_gpu


def test_peak_table_by_device_kind():
  assert bench_gpu.peak_tflops("NVIDIA H100 80GB HBM3") == {"bfloat16": 989.4, "float32": 494.7}
  assert bench_gpu.peak_tflops("NVIDIA H100 PCIe") == {"bfloat16": 756.0, "float32": 378.0}
  assert bench_gpu.peak_tflops("NVIDIA H200") == {"bfloat16": 989.4, "float32": 494.7}
  assert bench_gpu.peak_tflops("NVIDIA A100-SXM4-80GB")["bfloat16"] == 312.0
  assert bench_gpu.peak_tflops("NVIDIA H200 NVL") == {"bfloat16": None, "float32": None}  # not in the table
  assert bench_gpu.peak_tflops("cpu") == {"bfloat16": None, "float32": None}
  assert bench_gpu.peak_tflops("cpu", 100.0) == {"bfloat16": 100.0, "float32": 50.0}


def test_flops_of_a_matmul():
  a = jnp.zeros((64, 32))
  b = jnp.zeros((32, 16))
  flops = bench_gpu.flops_of(jax.jit(jnp.matmul).lower(a, b).compile())
  if jax.default_backend() == "cpu":  # XLA:CPU reports a cost analysis; a backend without one may give None
    assert flops is not None
  assert flops is None or flops == pytest.approx(2 * 64 * 32 * 16, rel=0.1)


@pytest.mark.slow
def test_tiny_sections_write_every_figure(tmp_path):
  out = tmp_path / "bench.json"
  result = bench_gpu.main(["--tiny", "--sections", "train_step,certify,store", "--dtypes", "float32,bfloat16",
                           "--out", str(out)])
  saved = json.loads(out.read_text())
  assert saved["tiny"] and saved["machine"]["device_kind"] == jax.devices()[0].device_kind
  rows = saved["train_step"]["rows"]
  assert [(r["conv"], r["dtype"]) for r in rows] == [("xla", "float32"), ("xla", "bfloat16"),
                                                      ("patches", "float32"), ("patches", "bfloat16")]
  for r in rows:
    assert r["ms_per_step"] > 0 and r["model_steps_per_s"] > 0 and r["projected_protocol_train_s"] > 0
  assert saved["certify"]["inputs_x_models_per_s"] > 0
  assert saved["store"]["store_size"] == 500 and saved["store"]["wall_ms"] > 0
  assert result["total_s"] == saved["total_s"]
