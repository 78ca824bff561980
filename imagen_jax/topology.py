"""TPU generations, slice names, and ahead-of-time memory/FLOP reports for a slice.

Pod-scale checks without a pod: with the `libtpu` package installed (the version that
`jax[tpu]` pins; for jax 0.10.2 that is libtpu 0.0.42.*), JAX makes compile-only devices for
any TPU topology on a CPU machine. A program jitted over a mesh of those devices compiles with
the real TPU compiler, so its per-chip memory and FLOPs are known before renting hardware:

    devices = topology_devices("v5litepod-16")                  # 16 abstract TPU v5e chips
    mesh = jax.sharding.Mesh(np.array(devices), ("data",))
    compiled = jax.jit(step, in_shardings=..., out_shardings=...).lower(*shapes).compile()
    report = compile_report(compiled, chip_spec("v5litepod-16"))
    print(format_fits_line(report))    # fits=true per_chip_bytes=... hbm_bytes=...

Names. Cloud accelerator types are "<prefix>-<N>": v4 and v5p count TensorCores (2 per chip,
so v4-256 is 128 chips), v5litepod (v5e) and v6e count chips. libtpu topologies are
"<gen>:<shape>" with the chip grid, e.g. "v4:4x4x8", "v5e:4x4". Every function here accepts
either form; "v5e-16" is accepted as another spelling of "v5litepod-16".
"""
import dataclasses
import importlib.metadata
import importlib.util
import math
import os
import re

# The MFU that est_step_time assumes when none is given: a round figure for a well-sharded
# convolutional U-Net step, not a measurement.
DEFAULT_MFU = 0.4

_GIB = 1 << 30


@dataclasses.dataclass(frozen=True)
class ChipSpec:
    """One TPU generation, per chip.

    hbm_bytes is the HBM the TPU compiler lets a program use on one chip (libtpu 0.0.42 prints it
    when a program does not fit); it is a little below the data-sheet capacity in `hbm_note`.
    """

    generation: str  # "v4", "v5e", "v5p", "v6e"
    accelerator_prefix: str  # Cloud accelerator-type prefix: "v4", "v5litepod", "v5p", "v6e"
    device_kind: str  # jax Device.device_kind of one chip, e.g. "TPU v5 lite"
    hbm_bytes: int  # usable HBM per chip, bytes
    hbm_note: str  # data-sheet capacity, for humans
    peak_bf16_flops: float  # peak dense bf16 FLOP/s per chip
    chips_per_host: int  # chips on one TPU VM of a multi-host slice
    cores_per_chip: int  # TensorCores per chip
    name_counts: str  # what N in "<prefix>-N" counts: "cores" or "chips"
    mesh_dims: int  # 3 (3D torus: v4, v5p) or 2 (2D torus: v5e, v6e)
    runtime_version: str  # default Cloud TPU VM software version for JAX
    max_chips: int  # largest single slice


# Peak FLOP/s and data-sheet HBM: the Cloud TPU system-architecture pages for each generation.
# Usable HBM: the "available HBM" libtpu 0.0.42 reports (30.75, 15.75, 95.74, 31.25 GiB).
# Runtime versions: the Cloud TPU "TPU software versions" page (PyTorch and JAX table).
GENERATIONS = {
    "v4": ChipSpec(
        generation="v4", accelerator_prefix="v4", device_kind="TPU v4",
        hbm_bytes=int(30.75 * _GIB), hbm_note="32 GiB HBM2",
        peak_bf16_flops=275e12, chips_per_host=4, cores_per_chip=2, name_counts="cores",
        mesh_dims=3, runtime_version="tpu-ubuntu2204-base", max_chips=4096),
    "v5e": ChipSpec(
        generation="v5e", accelerator_prefix="v5litepod", device_kind="TPU v5 lite",
        hbm_bytes=int(15.75 * _GIB), hbm_note="16 GB HBM2",
        peak_bf16_flops=197e12, chips_per_host=8, cores_per_chip=1, name_counts="chips",
        mesh_dims=2, runtime_version="v2-alpha-tpuv5-lite", max_chips=256),
    "v5p": ChipSpec(
        generation="v5p", accelerator_prefix="v5p", device_kind="TPU v5",
        hbm_bytes=int(95.74 * _GIB), hbm_note="95 GB HBM2e",
        peak_bf16_flops=459e12, chips_per_host=4, cores_per_chip=2, name_counts="cores",
        mesh_dims=3, runtime_version="v2-alpha-tpuv5", max_chips=6144),
    "v6e": ChipSpec(
        generation="v6e", accelerator_prefix="v6e", device_kind="TPU v6 lite",
        hbm_bytes=int(31.25 * _GIB), hbm_note="32 GB HBM",
        peak_bf16_flops=918e12, chips_per_host=8, cores_per_chip=1, name_counts="chips",
        mesh_dims=2, runtime_version="v2-alpha-tpuv6e", max_chips=256),
}

# Spellings of a generation in accelerator types and topology names.
_ALIASES = {"v4": "v4", "v5p": "v5p", "v5e": "v5e", "v5litepod": "v5e", "v5lite": "v5e",
            "v6e": "v6e"}

# 2D slices (v5e, v6e) come in these chip counts; the shape is the near-square power-of-two grid.
_SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8),
              128: (8, 16), 256: (16, 16)}


class TopologyError(ValueError):
    """An accelerator or topology name that this module cannot map to a TPU slice."""


@dataclasses.dataclass(frozen=True)
class SliceSpec:
    """A TPU slice: generation, chip grid, and where its chips live."""

    accelerator: str  # Cloud accelerator type, e.g. "v4-256"
    topology: str  # libtpu topology name, e.g. "v4:4x4x8"
    shape: tuple  # chip grid, e.g. (4, 4, 8)
    num_chips: int
    num_hosts: int  # TPU VMs ("workers") in the slice
    chip: ChipSpec


def _generation(prefix, name):
    gen = _ALIASES.get(prefix.lower())
    if gen is None:
        raise TopologyError(
            f"unknown TPU generation {prefix!r} in {name!r}; expected one of "
            f"{sorted(_ALIASES)} (e.g. 'v4-8', 'v5litepod-16', 'v5p-128', 'v6e-64', 'v4:2x2x1')")
    return GENERATIONS[gen]


def _default_shape(chip, num_chips, name):
    if chip.mesh_dims == 2:
        if num_chips not in _SHAPES_2D:
            raise TopologyError(
                f"{name!r}: a {chip.generation} slice has one of {sorted(_SHAPES_2D)} chips, "
                f"got {num_chips}")
        return _SHAPES_2D[num_chips]
    # 3D tori: 2x2x1 per host, then double the smallest side (2x2x2, 2x2x4, 2x4x4, 4x4x4, ...).
    largest = 1 << (chip.max_chips.bit_length() - 1)
    if num_chips < 4 or num_chips & (num_chips - 1) or num_chips > largest:
        raise TopologyError(
            f"{name!r}: no default shape for {num_chips} {chip.generation} chips (powers of two "
            f"from 4 to {largest} have one); give the topology instead, e.g. "
            f"'{chip.generation}:4x4x12'")
    shape = [2, 2, 1]
    while math.prod(shape) < num_chips:
        shape[0] *= 2
        shape.sort()
    return tuple(shape)


def slice_spec(name):
    """Parses "v4-256" / "v5litepod-16" / "v5e:4x4" / ... into a SliceSpec."""
    if not isinstance(name, str):
        raise TopologyError(f"TPU name must be a string, got {name!r}")
    text = name.strip()
    m = re.fullmatch(r"([a-z0-9]+):(\d+(?:x\d+)*)", text, re.IGNORECASE)
    if m:  # a topology name: "v4:4x4x8"
        chip = _generation(m.group(1), name)
        shape = tuple(int(s) for s in m.group(2).split("x"))
        if len(shape) != chip.mesh_dims or min(shape) < 1:
            raise TopologyError(
                f"{name!r}: a {chip.generation} topology has {chip.mesh_dims} dimensions "
                f"('AxB{'xC' if chip.mesh_dims == 3 else ''}'), got {m.group(2)!r}")
        num_chips = math.prod(shape)
        units = num_chips * (chip.cores_per_chip if chip.name_counts == "cores" else 1)
        accelerator = f"{chip.accelerator_prefix}-{units}"
    else:
        m = re.fullmatch(r"([a-z0-9]+)-(\d+)", text, re.IGNORECASE)
        if not m:
            raise TopologyError(
                f"cannot read TPU name {name!r}: expected an accelerator type like 'v4-256' or "
                f"'v5litepod-16', or a topology like 'v4:4x4x8' or 'v5e:4x4'")
        chip = _generation(m.group(1), name)
        units = int(m.group(2))
        per_chip = chip.cores_per_chip if chip.name_counts == "cores" else 1
        if units % per_chip:
            raise TopologyError(
                f"{name!r}: {chip.accelerator_prefix}-N counts TensorCores ({per_chip} per "
                f"chip), so N must be even, got {units}")
        num_chips = units // per_chip
        shape = _default_shape(chip, num_chips, name)
        accelerator = f"{chip.accelerator_prefix}-{units}"
    topology = f"{chip.generation}:{'x'.join(str(s) for s in shape)}"
    num_hosts = max(1, -(-num_chips // chip.chips_per_host))
    return SliceSpec(accelerator=accelerator, topology=topology, shape=shape,
                     num_chips=num_chips, num_hosts=num_hosts, chip=chip)


def chip_spec(name):
    """ChipSpec for a generation ("v5e"), accelerator type ("v4-256") or topology ("v6e:8x8")."""
    if isinstance(name, ChipSpec):
        return name
    if isinstance(name, SliceSpec):
        return name.chip
    if isinstance(name, str) and name.strip().lower() in _ALIASES:
        return GENERATIONS[_ALIASES[name.strip().lower()]]
    return slice_spec(name).chip


def topology_name(name):
    """libtpu topology name for an accelerator type: "v4-256" -> "v4:4x4x8"."""
    return slice_spec(name).topology


def _libtpu_available():
    return (importlib.util.find_spec("libtpu") is not None
            or bool(os.environ.get("TPU_LIBRARY_PATH")))


def _libtpu_requirement():
    """The libtpu pin of the installed jax's `tpu` extra, e.g. 'libtpu==0.0.42.*'."""
    try:
        for req in importlib.metadata.requires("jax") or ():
            if req.startswith("libtpu") and 'extra == "tpu"' in req:
                return req.split(";")[0].strip().replace(" ", "")
    except importlib.metadata.PackageNotFoundError:
        pass
    return "libtpu"


def _missing_libtpu_error(name, cause=None):
    import jax

    return RuntimeError(
        f"topology_devices({name!r}) needs the TPU compiler from the libtpu package, which is not "
        f"installed; install the version that jax {jax.__version__} pins: "
        f"pip install '{_libtpu_requirement()}'" + (f" ({cause})" if cause else ""))


def topology_devices(name):
    """Compile-only TPU devices for a whole slice, one per chip, in the order libtpu gives.

    name: accelerator type or topology ("v4-8", "v5litepod-16", "v5p:4x4x4"). The devices go into
    jax.sharding.Mesh for jax.jit(...).lower(...).compile(); they cannot run anything.
    Each device's process_index is its TPU VM, laid out as on the real slice.
    """
    spec = slice_spec(name)
    if not _libtpu_available():
        raise _missing_libtpu_error(name)
    from jax.experimental import topologies

    kwargs = {}
    if spec.chip.cores_per_chip == 2:
        # One JAX device per chip (both TensorCores driven together), as on real v4/v5p VMs.
        kwargs["chip_config_name"] = "megacore"
    if spec.chip.mesh_dims == 2:
        # v5e/v6e VMs hold up to 8 chips (2x4); smaller slices sit on one VM.
        x, y = spec.shape
        kwargs["chips_per_host_bounds"] = (min(x, 2), min(y, 4), 1)
    try:
        desc = topologies.get_topology_desc(spec.topology, "tpu", **kwargs)
    except RuntimeError as err:
        if "TPU support not installed" in str(err):
            raise _missing_libtpu_error(name, err) from err
        raise TopologyError(f"libtpu rejected topology {spec.topology!r} (from {name!r}): "
                            f"{err}") from err
    devices = list(desc.devices)
    if len(devices) != spec.num_chips:
        raise TopologyError(f"libtpu made {len(devices)} devices for {spec.topology!r} (from "
                            f"{name!r}), expected one per chip = {spec.num_chips}")
    return devices


def _first(value):
    # Older jax versions returned one entry per device (list); newer ones a single entry.
    if isinstance(value, (list, tuple)):
        return value[0] if value else None
    return value


def compile_report(compiled, spec, mfu=DEFAULT_MFU, loop_trips=1):
    """Per-chip memory and compute of a compiled program, against one chip's HBM and peak.

    compiled: jax.stages.Compiled (a program for one mesh; its numbers are per device = per chip).
    spec: ChipSpec, SliceSpec or a name ("v5e", "v4-256").
    mfu: model-FLOPs utilisation assumed for est_step_time (fraction of peak bf16 FLOP/s).
    loop_trips: how many times the program runs its main loop body (train.microbatches for a
      gradient-accumulating step). XLA's cost analysis counts a while-loop body once, so the
      FLOPs are multiplied by it (the work outside the loop, the optimizer update, is small).

    Returns a dict:
      argument_bytes, output_bytes, temp_bytes, alias_bytes, code_bytes: from memory_analysis().
      per_chip_bytes = argument + output - alias + temp + code (donated inputs reuse their
        buffers, so aliased bytes count once).
      hbm_bytes: usable HBM of one chip; fits: per_chip_bytes <= hbm_bytes.
      flops: per-chip FLOPs of one call, from cost_analysis() x loop_trips (None if the backend
        gives none).
      est_step_time: flops / (peak_bf16_flops * mfu), seconds; mfu; generation.
    """
    if not 0 < mfu <= 1:
        raise ValueError(f"mfu must be in (0, 1], got mfu={mfu!r}")
    chip = chip_spec(spec)
    mem = _first(compiled.memory_analysis())
    if mem is None:
        raise ValueError("compiled.memory_analysis() returned nothing; compile for a backend "
                         "that reports memory (TPU via topology_devices, or CPU)")
    argument = int(mem.argument_size_in_bytes)
    output = int(mem.output_size_in_bytes)
    alias = int(mem.alias_size_in_bytes)
    temp = int(mem.temp_size_in_bytes)
    code = int(getattr(mem, "generated_code_size_in_bytes", 0) or 0)
    per_chip = argument + output - alias + temp + code
    cost = _first(compiled.cost_analysis()) or {}
    flops = cost.get("flops")
    flops = float(flops) * loop_trips if flops is not None and flops >= 0 else None
    return {
        "generation": chip.generation,
        "argument_bytes": argument,
        "output_bytes": output,
        "temp_bytes": temp,
        "alias_bytes": alias,
        "code_bytes": code,
        "per_chip_bytes": per_chip,
        "hbm_bytes": chip.hbm_bytes,
        "fits": per_chip <= chip.hbm_bytes,
        "flops": flops,
        "mfu": float(mfu),
        "est_step_time": None if flops is None else flops / (chip.peak_bf16_flops * mfu),
    }


_OOM_RE = re.compile(r"required[^()]*\(([\d.]+)([KMGT]?)\)")


def compile_and_report(lowered, spec, mfu=DEFAULT_MFU, loop_trips=1):
    """Compiles `lowered` and reports it; a program too big for HBM gives fits=False, not an error.

    The TPU compiler refuses programs that exceed HBM (RESOURCE_EXHAUSTED), so compile_report
    never sees them; this turns that refusal into a report whose per_chip_bytes is the size the
    compiler printed (flops and est_step_time are None). Returns (compiled or None, report).
    """
    chip = chip_spec(spec)
    try:
        compiled = lowered.compile()
    except Exception as err:  # jax raises JaxRuntimeError, whose class moves between versions
        text = str(err)
        m = _OOM_RE.search(text)
        if "RESOURCE_EXHAUSTED" not in text or not m:
            raise
        scale = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[m.group(2)]
        report = {
            "generation": chip.generation, "per_chip_bytes": int(float(m.group(1)) * scale),
            "hbm_bytes": chip.hbm_bytes, "fits": False, "flops": None, "mfu": float(mfu),
            "est_step_time": None, "error": text.splitlines()[0],
        }
        return None, report
    return compiled, compile_report(compiled, chip, mfu, loop_trips)


def format_fits_line(report):
    """'fits=<true|false> per_chip_bytes=<int> hbm_bytes=<int>' for logs and scripts."""
    return (f"fits={'true' if report['fits'] else 'false'} "
            f"per_chip_bytes={int(report['per_chip_bytes'])} hbm_bytes={int(report['hbm_bytes'])}")
