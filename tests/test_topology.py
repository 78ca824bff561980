"""imagen_jax.topology: slice names, and real TPU compiles (libtpu) of a sharded matmul on CPU."""
import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from imagen_jax import topology

GIB = 1 << 30


@pytest.mark.parametrize(
    "name, topo, chips, hosts",
    [
        ("v4-8", "v4:2x2x1", 4, 1),
        ("v4-256", "v4:4x4x8", 128, 32),  # v4 counts TensorCores: 2 per chip
        ("v5litepod-16", "v5e:4x4", 16, 2),  # v5e counts chips
        ("v5e-16", "v5e:4x4", 16, 2),
        ("v5p-128", "v5p:4x4x4", 64, 16),
        ("v6e-64", "v6e:8x8", 64, 8),
        ("v5litepod-8", "v5e:2x4", 8, 1),
        ("v5p:4x4x8", "v5p:4x4x8", 128, 32),
    ],
)
def test_slice_names(name, topo, chips, hosts):
    spec = topology.slice_spec(name)
    assert (spec.topology, spec.num_chips, spec.num_hosts) == (topo, chips, hosts)
    assert topology.topology_name(name) == topo


def test_topology_name_round_trips_to_accelerator():
    assert topology.slice_spec("v4:4x4x8").accelerator == "v4-256"
    assert topology.slice_spec("v5e:4x4").accelerator == "v5litepod-16"


def test_chip_table():
    v4, v5e, v5p, v6e = (topology.chip_spec(g) for g in ("v4", "v5litepod", "v5p", "v6e"))
    assert [c.peak_bf16_flops for c in (v4, v5e, v5p, v6e)] == [275e12, 197e12, 459e12, 918e12]
    # Usable HBM: below the data-sheet capacity, never above it.
    for chip, sheet in ((v4, 32 * GIB), (v5e, 16 * GIB), (v5p, 96 * GIB), (v6e, 32 * GIB)):
        assert 0.9 * sheet < chip.hbm_bytes <= sheet
    assert (v4.chips_per_host, v5e.chips_per_host, v5p.chips_per_host, v6e.chips_per_host) == (
        4, 8, 4, 8)
    assert topology.chip_spec("v4-256") is v4
    assert topology.chip_spec("v6e:8x8") is v6e


@pytest.mark.parametrize("bad", ["v7-8", "tpu-8", "v4-6", "v5litepod-12", "v4:2x2", "v4"])
def test_unknown_name_is_a_clear_error(bad):
    with pytest.raises(topology.TopologyError, match=re.escape(repr(bad))):
        topology.slice_spec(bad)


def test_unknown_name_in_topology_devices():
    with pytest.raises(topology.TopologyError, match="'v9-32'"):
        topology.topology_devices("v9-32")


def test_missing_libtpu_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(topology, "_libtpu_available", lambda: False)
    with pytest.raises(RuntimeError, match=r"libtpu.*pip install 'libtpu"):
        topology.topology_devices("v4-8")


def _sharded_matmul(devices, m=1024, k=512, n=256):
    """tanh(x @ w) with x sharded over 'data' rows and w replicated; bf16."""
    mesh = Mesh(np.array(devices), ("data",))
    fn = jax.jit(
        lambda x, w: jnp.tanh(x @ w),
        in_shardings=(NamedSharding(mesh, P("data", None)), NamedSharding(mesh, P())),
        out_shardings=NamedSharding(mesh, P("data", None)),
    )
    x = jax.ShapeDtypeStruct((m, k), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((k, n), jnp.bfloat16)
    return fn.lower(x, w)


@pytest.mark.parametrize("name, kind", [("v4-8", "TPU v4"), ("v5litepod-8", "TPU v5 lite")])
def test_compile_report_for_a_real_topology(name, kind):
    devices = topology.topology_devices(name)
    spec = topology.slice_spec(name)
    assert len(devices) == spec.num_chips
    assert {d.platform for d in devices} == {"tpu"}
    assert {d.device_kind for d in devices} == {kind}
    assert len({d.process_index for d in devices}) == spec.num_hosts

    m, k, n, chips = 1024, 512, 256, spec.num_chips
    compiled = _sharded_matmul(devices, m, k, n).compile()
    report = topology.compile_report(compiled, name, mfu=0.5)

    # Per chip: a 1/chips row block of x and of the output, and all of w (bf16 = 2 bytes).
    assert report["argument_bytes"] == 2 * (m // chips * k + k * n)
    assert report["output_bytes"] == 2 * (m // chips * n)
    assert report["alias_bytes"] == 0
    assert report["per_chip_bytes"] == (report["argument_bytes"] + report["output_bytes"]
                                        + report["temp_bytes"] + report["code_bytes"])
    assert report["hbm_bytes"] == spec.chip.hbm_bytes and report["fits"] is True
    # The matmul's 2*m*k*n FLOPs split over the chips, plus a few per output for tanh.
    matmul_flops = 2 * m * k * n / chips
    assert matmul_flops <= report["flops"] <= 1.05 * matmul_flops
    assert report["est_step_time"] == pytest.approx(
        report["flops"] / (spec.chip.peak_bf16_flops * 0.5))

    line = topology.format_fits_line(report)
    assert re.fullmatch(r"fits=(true|false) per_chip_bytes=\d+ hbm_bytes=\d+", line), line
    assert line == (f"fits=true per_chip_bytes={report['per_chip_bytes']} "
                    f"hbm_bytes={spec.chip.hbm_bytes}")


def test_too_big_for_hbm_reports_fits_false():
    devices = topology.topology_devices("v5litepod-8")
    mesh = Mesh(np.array(devices), ("data",))
    # 32 GiB replicated on every 16 GiB chip: the TPU compiler refuses it.
    big = jax.ShapeDtypeStruct((1 << 17, 1 << 16), jnp.float32, sharding=NamedSharding(mesh, P()))
    compiled, report = topology.compile_and_report(jax.jit(lambda a: a * 2 + 1).lower(big), "v5e")
    assert compiled is None
    assert report["fits"] is False and report["per_chip_bytes"] > report["hbm_bytes"]
    assert topology.format_fits_line(report).startswith("fits=false per_chip_bytes=")


def test_fits_false_from_spec_limit():
    # The same program counted against a chip with less HBM than it needs.
    compiled = _sharded_matmul(topology.topology_devices("v4-8")).compile()
    tiny = dataclasses.replace(topology.chip_spec("v4"), hbm_bytes=1000)
    report = topology.compile_report(compiled, tiny)
    assert report["fits"] is False
    assert topology.format_fits_line(report) == (
        f"fits=false per_chip_bytes={report['per_chip_bytes']} hbm_bytes=1000")


def test_compile_report_on_cpu_mesh():
    # The report also reads a CPU compile (the 8 simulated devices): trainers can log it anywhere.
    compiled = _sharded_matmul(jax.devices()[:8]).compile()
    report = topology.compile_report(compiled, "v5e")
    assert report["argument_bytes"] == 2 * (1024 // 8 * 512 + 512 * 256)
    assert report["fits"] is True


def test_bad_mfu():
    compiled = _sharded_matmul(jax.devices()[:8]).compile()
    with pytest.raises(ValueError, match="mfu=0"):
        topology.compile_report(compiled, "v5e", mfu=0)


def test_loop_trips_scale_scanned_flops():
    """cost_analysis counts a while-loop body once (here on the TPU compiler): a step that
    accumulates gradients over microbatches reports its FLOPs with loop_trips=microbatches."""
    devices = topology.topology_devices("v4-8")
    mesh = Mesh(np.array(devices), ("data",))
    x = jax.ShapeDtypeStruct((512, 512), jnp.bfloat16, sharding=NamedSharding(mesh, P("data")))
    w = jax.ShapeDtypeStruct((512, 512), jnp.bfloat16, sharding=NamedSharding(mesh, P()))

    def scanned(a, b):
        return jax.lax.scan(lambda c, _: (c + jnp.tanh(a @ b), None), jnp.zeros_like(a), None, length=4)[0]

    compiled = jax.jit(scanned).lower(x, w).compile()
    once = topology.compile_report(compiled, "v4")["flops"]
    body = 2 * 512 * 512 * 512 / len(devices)
    assert body <= once <= 1.1 * body  # one body, not four
    assert topology.compile_report(compiled, "v4", loop_trips=4)["flops"] == pytest.approx(4 * once)
