"""GPU and node descriptions (configs/hardware/*.yaml and their fit files), validated once into frozen dataclasses."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

from .configs import CONFIG_DIR, display_path, names_in, read_yaml, resolve, unknown_field
from .errors import SimInputError
from .grids import GRIDS

GIB = 1 << 30
MIB = 1 << 20


@dataclass(frozen=True)
class KernelFit:
    """Fitted time of one decode-attention kernel family (kvq_sim.calibrate; model in latency.attention_kernel_us).

    time_us = overhead_us + program_us * programs / SMs
              + wave * max(bytes / (efficiency * hbm_bandwidth_gb_s),
                           unpack_ps_per_kv_element * kv_elements + dot_ps_per_q_element * q_elements)
    where programs and the split come from the kernel's launch rule (kvq_sim.grids, `grid`), wave =
    ceil(w) / w for w = main programs / (SMs * programs_per_sm) (1 when programs_per_sm is 0), and
    efficiency is nosplit_bandwidth_efficiency for a launch that does not split the context (when set), and a
    launch that splits it into S splits adds split_overhead_us + split_us_per_split * S (FlashAttention-2's
    split-KV path launches a second, combine kernel, whose programs loop over the splits one after another;
    kvq's kernels run their combine pass either way, inside overhead_us).
    """

    family: str  # impl, plus _<bits>b_<mha|gqa> when packed: kvq_fp16, sdpa_flash_fp16, kvq_kivi_2b_mha
    bound: str  # the form the data chose: "bandwidth" (compute terms 0) or "compute"
    overhead_us: float  # fixed time per launch (launch, split-KV combine, tail)
    bandwidth_efficiency: float  # fraction of hbm_bandwidth_gb_s the kernel streams at
    unpack_ps_per_kv_element: float  # picoseconds per K/V element read and dequantized
    dot_ps_per_q_element: float  # picoseconds per query-head multiply-add over K/V
    grid: str = ""  # launch rule (kvq_sim.grids.GRIDS): "kvq", "flash", or "" (no grid terms)
    block_tokens: int = 0  # kvq grid: context tokens per tile (the kernel's BLOCK_N)
    split_waves: int = 0  # kvq grid: waves of programs the split rule aims for
    tail_programs_per_row: int = 0  # kvq grid: extra programs per (sequence, KV head) for the fp16 tail
    resident_programs_per_sm: int = 0  # kvq grid: programs an SM holds at once, whose waves the splits fill; 0: 1
    program_us: float = 0.0  # fixed time per program per SM (prologue, partial write, combine share)
    programs_per_sm: int = 0  # resident programs per SM for the wave-tail factor; 0: not modelled
    nosplit_bandwidth_efficiency: float = 0.0  # efficiency of launches that do not split; 0: same as split
    split_overhead_us: float = 0.0  # fixed time a launch that splits the context adds (flash grid)
    split_us_per_split: float = 0.0  # time a split launch adds per split (flash grid: its combine's loop)


@dataclass(frozen=True)
class Calibration:
    """Efficiency factors and fixed costs a measurement fits; YAML defaults are uncalibrated priors."""

    calibrated: bool
    source: str
    weight_bandwidth_efficiency: float  # fraction of hbm_bandwidth_gb_s a decode GEMV reaches
    kv_fp16_bandwidth_efficiency: float  # same for fp16 decode attention
    kv_quantized_bandwidth_efficiency: float  # same for fused dequantize + attention over packed codes
    tensor_core_efficiency: float  # fraction of dense tensor FLOP/s a large matmul reaches
    interconnect_efficiency: float  # fraction of the per-direction link bandwidth a collective reaches
    kernel_launch_overhead_us: float  # fixed cost per kernel in a decode step
    cuda_context_mib: float  # device memory the CUDA context + framework take before any tensor
    framework_workspace_mib: float  # cuBLAS / attention workspaces held during a step
    attention_kernels: tuple[KernelFit, ...] = ()  # fitted kernel families; empty when uncalibrated
    transferred_from: str = ""  # the measured GPU this calibration was carried over from; "" if none
    weight_gemv_rule: str = ""  # a fitted transfer rule that set weight_bandwidth_efficiency (transfer-rules.yaml)
    e2e_measured: bool = False  # weight GEMV efficiency and per-kernel cost fitted on decode steps (`e2e_fit`)

    @property
    def status(self) -> str:
        """How the latency efficiencies were obtained: "calibrated" (fitted to this GPU's measurements),
        "transferred from <gpu>" (another GPU's fit scaled by docs/validation.md's rules) or "uncalibrated
        priors" (the YAML's defaults)."""
        if self.calibrated:
            return "calibrated"
        if self.transferred_from:
            return f"transferred from {self.transferred_from}"
        return "uncalibrated priors"

    def kernel(self, family: str) -> KernelFit | None:
        """The fitted family by exact name, or None when this GPU has no fit for it."""
        return next((k for k in self.attention_kernels if k.family == family), None)


@dataclass(frozen=True)
class CollectiveFit:
    """Measured collective costs of one multi-GPU layout (kvq_sim.multigpu.fit): per call, per byte, and the
    factor on the rest of the step once weights and heads are sharded."""

    layout: str  # parallelism and GPU count: "tp2", "cp4"
    shard_scale: float  # measured / modelled step time without collectives
    latency_us: float  # per collective call
    bandwidth_gb_s: float  # bytes of kvq-sim's collective model per second; 0: per-byte cost not resolved
    train_points: int = 0
    mape_pct: float = 0.0
    worst_pct: float = 0.0
    max_call_bytes: float = 0.0  # largest bytes a GPU sends in one call among the training points; 0: not recorded


@dataclass(frozen=True)
class Hardware:
    """One GPU kind, or a node of `gpus` identical GPUs joined by `interconnect`."""

    name: str
    description: str
    source_file: str
    gpus: int
    nominal_memory_gib: float
    usable_memory_bytes: int  # what torch.cuda reports as total_memory (measured or by the stated rule)
    hbm_bandwidth_gb_s: float
    fp16_dense_tflops: float
    int8_dense_tops: float
    l2_mib: float
    sm_count: int
    interconnect: str
    interconnect_bandwidth_gb_s: float  # datasheet figure, both directions summed
    interconnect_latency_us: float
    calibration: Calibration
    torch_device_name: str | None = None  # torch.cuda.get_device_name() of the measured GPU, if any
    boost_clock_mhz: float | None = None  # SM boost clock: scales per-element (CUDA-core) costs in transfer
    collectives: tuple[CollectiveFit, ...] = ()  # measured multi-GPU layouts (`collectives_fit:` file)
    collectives_source: str = ""  # the fit file and the measurements it came from
    # a fitted transfer rule's all-reduce latency per extra GPU, added to interconnect_latency_us for layouts
    # without a measured fit (transfer-rules.yaml); 0: none
    interconnect_hop_latency_us: float = 0.0
    interconnect_rule: str = ""

    def collective(self, layout: str) -> CollectiveFit | None:
        """The measured fit of a layout ("tp2"), or None where the interconnect priors apply."""
        return next((c for c in self.collectives if c.layout == layout), None)

    @property
    def usable_memory_gib(self) -> float:
        return self.usable_memory_bytes / GIB

    @property
    def reserve_bytes(self) -> int:
        """Bytes held before any model tensor: CUDA context plus framework workspaces."""
        c = self.calibration
        return int((c.cuda_context_mib + c.framework_workspace_mib) * MIB)

    @property
    def link_bandwidth_bytes_s(self) -> float:
        """Per-direction bandwidth a collective can use: half the bidirectional datasheet figure."""
        return self.interconnect_bandwidth_gb_s * 1e9 / 2 * self.calibration.interconnect_efficiency


_INTERCONNECTS = ("nvlink", "pcie")
_KERNEL_BOUNDS = ("bandwidth", "compute")
_CAL_KEYS = {
    "weight_gemv": "weight_bandwidth_efficiency",
    "attention_fp16": "kv_fp16_bandwidth_efficiency",
    "attention_quantized": "kv_quantized_bandwidth_efficiency",
}
#: the lowest efficiency accepted: 0.1% of a datasheet peak (the slowest measured kvq kernel streams at 9%)
MIN_EFFICIENCY = 1e-3

# Every field a hardware YAML may hold: None is a value, a dict a section, "*" any name (a kernel family).
_FIT = dict.fromkeys(("train_points", "mape_pct", "worst_pct"))
_PROVENANCE = dict.fromkeys(("file", "commit", "date"))
_KERNEL = {
    **dict.fromkeys(
        (
            "bound", "overhead_us", "bandwidth_efficiency", "unpack_ps_per_kv_element", "dot_ps_per_q_element",
            "grid", "program_us", "programs_per_sm", "nosplit_bandwidth_efficiency", "split_overhead_us",
            "split_us_per_split", "block_tokens", "split_waves", "tail_programs_per_row", "resident_programs_per_sm",
        )
    ),
    "fit": _FIT,
}  # fmt: skip
_SCHEMA = {
    **dict.fromkeys(
        (
            "base", "description", "gpus", "nominal_memory_gib", "usable_memory_bytes", "hbm_bandwidth_gb_s",
            "fp16_dense_tflops", "int8_dense_tops", "l2_mib", "sm_count", "boost_clock_mhz", "torch_device_name",
            "interconnect", "interconnect_bandwidth_gb_s", "interconnect_latency_us", "collectives_fit",
            "calibration_fit",
        )
    ),
    "calibration": {
        **dict.fromkeys(
            (
                "calibrated", "source", "transferred_from", "tensor_core_efficiency", "interconnect_efficiency",
                "kernel_launch_overhead_us", "cuda_context_mib", "framework_workspace_mib",
            )
        ),
        "measurements": {"kernel": _PROVENANCE, "e2e": _PROVENANCE},
        "bandwidth_efficiency": dict.fromkeys(_CAL_KEYS),
        "attention_kernels": {"*": _KERNEL},
        "e2e_fit": _FIT,
    },
}  # fmt: skip

#: per-GPU fields a calibration is measured with: a `base:` file that changes one describes another GPU,
#: so the base's fit is carried over by the transfer rules (transferred), not reused as is
PER_GPU_FIELDS = (
    "nominal_memory_gib", "usable_memory_bytes", "hbm_bandwidth_gb_s", "fp16_dense_tflops", "int8_dense_tops",
    "l2_mib", "sm_count", "boost_clock_mhz",
)  # fmt: skip


def _check_schema(node, schema: dict, where: str, section: str = "") -> None:
    """Every section a mapping and every field a known one; a misspelt field names the closest known one."""
    if not isinstance(node, dict):
        got = "nothing" if node is None else type(node).__name__
        raise SimInputError(f"{where}: field '{section}' must be a mapping of fields, got {got}")
    for key, value in node.items():
        if "*" in schema:
            if not isinstance(key, str):
                raise SimInputError(f"{where}: field '{section}.{key}' must be named by a string")
            sub = schema["*"]
        elif key in schema:
            sub = schema[key]
        else:
            raise unknown_field(key, schema, where, section)
        name = f"{section}.{key}" if section else str(key)
        if isinstance(sub, dict):
            _check_schema(value, sub, where, name)
        elif isinstance(value, (dict, list)):
            raise SimInputError(f"{where}: field '{name}' must be a single value, got a {type(value).__name__}")


class _Fields:
    """Typed reads from a config mapping; every failure names the file and the field."""

    def __init__(self, data: dict, where: str):
        self.data, self.where = data, where

    def _get(self, key: str):
        node = self.data
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                hint = ""
                if "base" not in self.data:  # a user's own GPU file: inherit everything it does not set
                    hint = " (or start the file with 'base: <gpu>' to inherit the fields it does not set; kvq-sim list gpus)"
                raise SimInputError(f"{self.where}: missing field '{key}'{hint}")
            node = node[part]
        return node

    def number(self, key: str, low: float, high: float, *, integer: bool = False, low_open: bool = False) -> float:
        """A finite number in [low, high] ((low, high] with low_open); NaN, inf, bools and strings are refused."""
        v = self._get(key)
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        ok = ok and (low < v if low_open else low <= v) and v <= high
        if ok and integer and not float(v).is_integer():
            ok = False
        if not ok:
            kind = "an integer" if integer else "a number"
            if low == 0 and low_open:
                kind = f"a positive {kind.split()[-1]}"
            elif low > 0:
                kind = f"a positive {kind.split()[-1]} from {low:g}"
            raise SimInputError(f"{self.where}: field '{key}' must be {kind} up to {high:g}, got {v!r}{_text_hint(v)}")
        return int(v) if integer else float(v)

    def fraction(self, key: str) -> float:
        return self.number(key, MIN_EFFICIENCY, 1.0)

    def text(self, key: str, choices: tuple[str, ...] | None = None) -> str:
        v = self._get(key)
        if not isinstance(v, str) or (choices and v not in choices):
            want = f"one of {', '.join(choices)}" if choices else "a string"
            raise SimInputError(f"{self.where}: field '{key}' must be {want}, got {v!r}")
        return v

    def boolean(self, key: str) -> bool:
        v = self._get(key)
        if not isinstance(v, bool):
            raise SimInputError(f"{self.where}: field '{key}' must be true or false, got {v!r}")
        return v


def _text_hint(v) -> str:
    """Why a number-looking value is text: YAML 1.1 reads 1e3 as a string (a float needs '.' and a signed exponent)."""
    try:
        float(v) if isinstance(v, str) else None
    except ValueError:
        return ""
    return " (text, not a number: write exponents as 1.0e+3)" if isinstance(v, str) else ""


def _merge_calibration(under: dict, over: dict) -> dict:
    """`calibration` fields of `over` over those of `under`; `bandwidth_efficiency` merges field by field."""
    merged = {**under, **over}
    if "bandwidth_efficiency" in over:
        merged["bandwidth_efficiency"] = {**under.get("bandwidth_efficiency", {}), **over["bandwidth_efficiency"]}
    return merged


def _merge(parent: dict, child: dict) -> dict:
    """The child's fields over its base's; `calibration` and its `bandwidth_efficiency` merge field by field."""
    merged = {**parent, **{k: v for k, v in child.items() if k not in ("base", "calibration")}}
    merged["calibration"] = _merge_calibration(parent.get("calibration", {}), child.get("calibration", {}))
    return merged


def calibration_fit_path(path: Path, data: dict | None = None) -> Path | None:
    """The fit file a GPU file names in `calibration_fit:` (relative to the GPU file), None when it names none."""
    ref = (read_yaml(path) if data is None else data).get("calibration_fit")
    if ref is None:
        return None
    if not isinstance(ref, str) or not ref:
        raise SimInputError(f"{display_path(path)}: field 'calibration_fit' must be a file path, got {ref!r}")
    return path.parent / ref


def read_calibration_fit(path: Path) -> dict:
    """A fit file `kvq-sim calibrate` wrote: fields of a GPU file's `calibration:` section, checked by name."""
    data = read_yaml(path)
    _check_schema(data, _SCHEMA["calibration"], display_path(path))
    return data


def _with_calibration_fit(data: dict, path: Path, fit_file: Path | None) -> tuple[dict, Path | None]:
    """(`data` with the fitted fields of its `calibration_fit:` file (or of `fit_file`) over its own
    `calibration:` priors, the fit file merged); unchanged and None when it names none, or names one `kvq-sim
    calibrate` has not written yet (a GPU drafted for calibration: its plans say "uncalibrated priors")."""
    fit_file = fit_file or calibration_fit_path(path, data)
    if fit_file is None or not fit_file.exists():
        return data, None
    fit = read_calibration_fit(fit_file)
    return {**data, "calibration": _merge_calibration(data.get("calibration", {}), fit)}, fit_file


def _load(path: Path, seen: tuple[Path, ...] = (), fit_file: Path | None = None) -> tuple[dict, Hardware, Hardware]:
    """(merged fields, the Hardware, the Hardware whose file set `calibration.calibrated`) of one file and its
    `base:` chain. A file that changes a per-GPU field of its base (PER_GPU_FIELDS) is another GPU: usable
    memory follows a changed nominal memory (the base's measured gap kept), and a calibration made on
    the base is carried over by the transfer rules and labelled so, never reported as measured on it.
    `fit_file` is read instead of the file's own `calibration_fit:` (a new fit checked before it is written)."""
    where = display_path(path)
    data = read_yaml(path)
    _check_schema(data, _SCHEMA, where)
    data, merged_fit = _with_calibration_fit(data, path, fit_file)
    cal_where = f"{where} (calibration from {display_path(merged_fit)})" if merged_fit else where
    base = data.get("base")
    if base is None:
        hw = _with_collectives(parse_hardware(data, where, path.stem, cal_where), data, path, None)
        return data, hw, hw
    if not isinstance(base, str) or not base:
        raise SimInputError(f"{where}: field 'base' must be a GPU name, got {base!r}")
    base_path = resolve("hardware", base) if "/" in base or base.endswith(".yaml") else _named(base, path)
    if base_path.resolve() in (*seen, path.resolve()):
        raise SimInputError(f"{where}: field 'base' forms a cycle through {base!r}")
    parent_data, parent, origin = _load(base_path, (*seen, path.resolve()))
    merged = _merge(parent_data, data)
    f = _Fields(merged, where)
    if "nominal_memory_gib" in data and "usable_memory_bytes" not in data:
        # the driver and ECC keep the same bytes of a larger or smaller memory: the base's measured gap
        nominal = f.number("nominal_memory_gib", *_BOUNDS["nominal_memory_gib"])
        gap = parent.nominal_memory_gib * GIB - parent.usable_memory_bytes
        merged["usable_memory_bytes"] = max(1, round(nominal * GIB - gap))
    if "calibrated" in data.get("calibration", {}):
        hw = _with_collectives(parse_hardware(merged, where, path.stem, cal_where), data, path, parent)
        return merged, hw, hw
    if "torch_device_name" not in data and any(merged.get(k) != parent_data.get(k) for k in PER_GPU_FIELDS):
        merged.pop("torch_device_name", None)  # measurements of the base GPU must not match this one
    hw = parse_hardware(merged, where, path.stem, cal_where)
    if any(getattr(hw, k) != getattr(origin, k) for k in PER_GPU_FIELDS):
        hw = replace(hw, calibration=_carried_over(origin, hw))
    return merged, _with_collectives(hw, data, path, parent), origin


def _carried_over(origin: Hardware, hw: Hardware) -> Calibration:
    """`hw`'s calibration when its per-GPU fields differ from those of the GPU its calibration was made for:
    a measured fit transferred from that GPU, a transferred one re-transferred from its measured source,
    uncalibrated priors left as they are."""
    cal = hw.calibration
    if cal.calibrated:
        return transferred(replace(origin, calibration=cal), hw)
    if cal.transferred_from:
        return transferred(load_hardware(cal.transferred_from), hw)
    return cal


def transferred(src: Hardware, dst: Hardware) -> Calibration:
    """`dst`'s calibration carried over from the measured `src` by the rules of docs/validation.md:

    - bandwidth efficiencies (per kernel family, weight GEMV, fp16 attention): unchanged, as fractions of
      each GPU's own datasheet memory bandwidth;
    - per-element costs (ps per K/V or query element, CUDA-core unpack and FMA work): times
      (src SMs * src boost clock) / (dst SMs * dst boost clock);
    - fixed overheads (per launch, per kernel in a step): unchanged (host, driver and graph-replay bound);
    - per-program time (program_us) and per-split combine time (split_us_per_split): times src boost clock /
      dst boost clock (work of one SM, one step after another); the launch grid itself (programs, splits, wave
      tail) is recomputed with dst's SM count;
    - tensor-core, interconnect and memory-reserve priors: dst's own, untouched.
    E.g. H100 -> A100: 132 * 1980 / (108 * 1410) = 1.716x the per-element cost.
    """
    for h in (src, dst):
        if h.boost_clock_mhz is None:
            raise SimInputError(f"{h.source_file}: field 'boost_clock_mhz' is needed to transfer a calibration")
    if not src.calibration.calibrated:
        raise SimInputError(f"{src.name} is not calibrated from measurements: run kvq-sim calibrate --gpu {src.name}")
    scale = (src.sm_count * src.boost_clock_mhz) / (dst.sm_count * dst.boost_clock_mhz)
    s = src.calibration
    kernels = tuple(
        replace(
            k,
            unpack_ps_per_kv_element=k.unpack_ps_per_kv_element * scale,
            dot_ps_per_q_element=k.dot_ps_per_q_element * scale,
            program_us=k.program_us * src.boost_clock_mhz / dst.boost_clock_mhz,
            split_us_per_split=k.split_us_per_split * src.boost_clock_mhz / dst.boost_clock_mhz,
        )
        for k in s.attention_kernels
    )
    return replace(
        dst.calibration,
        calibrated=False,
        source=f"transferred from {src.name} ({s.source}) by the rules of docs/validation.md",
        transferred_from=src.name,
        weight_bandwidth_efficiency=s.weight_bandwidth_efficiency,
        kv_fp16_bandwidth_efficiency=s.kv_fp16_bandwidth_efficiency,
        kv_quantized_bandwidth_efficiency=s.kv_quantized_bandwidth_efficiency,
        kernel_launch_overhead_us=s.kernel_launch_overhead_us,
        attention_kernels=kernels,
    )


def _named(base: str, referrer: Path) -> Path:
    """A `base:` GPU next to the referring file, else among the shipped configs."""
    for p in (referrer.parent / f"{base}.yaml", CONFIG_DIR / "hardware" / f"{base}.yaml"):
        if p.is_file():
            return p
    raise SimInputError(
        f"{display_path(referrer)}: field 'base' names unknown GPU {base!r}; valid: {', '.join(hardware_names())}"
    )


#: (low, high) of each per-GPU number: physical ranges with room beyond every GPU made (B200: 8,000 GB/s,
#: 2,250 dense fp16 TFLOP/s, 192 GB), so a unit slip (GB/s given in TB/s, bytes in GiB) is refused.
_BOUNDS = {
    "gpus": (1, 1024),
    "nominal_memory_gib": (1, 16384),
    "usable_memory_bytes": (GIB, 16384 * GIB),
    "hbm_bandwidth_gb_s": (10, 100_000),
    "fp16_dense_tflops": (1, 100_000),
    "int8_dense_tops": (1, 200_000),
    "l2_mib": (0.25, 65536),
    "sm_count": (1, 65536),
    "boost_clock_mhz": (100, 10_000),
    "interconnect_bandwidth_gb_s": (0.1, 100_000),
    "interconnect_latency_us": (0, 1e6),
}
#: (low, high) of calibrated costs: 0 (not modelled) up to a second per launch or a microsecond per element
_COST_BOUNDS = (0, 1e6)


def parse_hardware(data: dict, where: str, name: str, cal_where: str | None = None) -> Hardware:
    """Validate a hardware mapping (already merged with its base) into a Hardware; `cal_where` names the
    calibration fields' source in errors (the GPU file with the fit file merged over it), default `where`."""
    f = _Fields(data, where)
    c = _Fields(data, cal_where or where)
    cal_section = c._get("calibration")
    cal = Calibration(
        calibrated=c.boolean("calibration.calibrated"),
        source=c.text("calibration.source"),
        **{attr: c.fraction(f"calibration.bandwidth_efficiency.{key}") for key, attr in _CAL_KEYS.items()},
        tensor_core_efficiency=c.fraction("calibration.tensor_core_efficiency"),
        interconnect_efficiency=c.fraction("calibration.interconnect_efficiency"),
        kernel_launch_overhead_us=c.number("calibration.kernel_launch_overhead_us", 0, 1e4),
        cuda_context_mib=c.number("calibration.cuda_context_mib", 0, 1 << 20),
        framework_workspace_mib=c.number("calibration.framework_workspace_mib", 0, 1 << 20),
        attention_kernels=_kernel_fits(cal_section.get("attention_kernels", {}), cal_where or where),
        transferred_from=c.text("calibration.transferred_from") if "transferred_from" in cal_section else "",
        e2e_measured="e2e_fit" in cal_section,
    )
    ints = ("gpus", "usable_memory_bytes", "sm_count")
    num = {k: f.number(k, *_BOUNDS[k], integer=k in ints) for k in _BOUNDS if k != "boost_clock_mhz"}
    hw = Hardware(
        name=name,
        description=f.text("description"),
        source_file=where,
        **num,
        interconnect=f.text("interconnect", _INTERCONNECTS),
        calibration=cal,
        torch_device_name=f.text("torch_device_name") if "torch_device_name" in data else None,
        boost_clock_mhz=f.number("boost_clock_mhz", *_BOUNDS["boost_clock_mhz"]) if "boost_clock_mhz" in data else None,
    )
    if hw.usable_memory_bytes > hw.nominal_memory_gib * GIB:
        raise SimInputError(
            f"{where}: usable_memory_bytes ({hw.usable_memory_gib:.2f} GiB) exceeds nominal_memory_gib "
            f"({hw.nominal_memory_gib:g} GiB)"
        )
    if hw.reserve_bytes >= hw.usable_memory_bytes:
        raise SimInputError(f"{where}: calibration reserve ({hw.reserve_bytes / GIB:.2f} GiB) exceeds usable memory")
    return hw


_COLLECTIVE_FIELDS = (
    "shard_scale", "latency_us", "bandwidth_gb_s", "train_points", "mape_pct", "worst_pct", "max_call_bytes",
)  # fmt: skip


def _with_collectives(hw: Hardware, data: dict, yaml_path: Path, inherited: Hardware | None) -> Hardware:
    """`hw` with the measured collective fits its own `collectives_fit:` names (a path relative to its YAML), or
    those its base carried; a node that changes a per-GPU field measured nothing of its base's collectives."""
    ref = data.get("collectives_fit")
    if ref is None:
        if inherited is None or any(getattr(hw, k) != getattr(inherited, k) for k in PER_GPU_FIELDS):
            return hw
        return replace(hw, collectives=inherited.collectives, collectives_source=inherited.collectives_source)
    where = display_path(yaml_path)
    if not isinstance(ref, str) or not ref:
        raise SimInputError(f"{where}: field 'collectives_fit' must be a file path, got {ref!r}")
    return replace(hw, **_collectives(yaml_path.parent / ref, where, ref))


def _collectives(path: Path, where: str, ref: str) -> dict:
    """Hardware fields from a collectives fit file: {layouts: {tp2: {shard_scale, latency_us, ...}}, source}."""
    if not path.is_file():
        raise SimInputError(f"{where}: field 'collectives_fit' names {ref}, which does not exist")
    data = read_yaml(path)
    fw = display_path(path)
    if not isinstance(data, dict) or not isinstance(data.get("layouts"), dict) or not data["layouts"]:
        raise SimInputError(f"{fw}: expected a mapping with a non-empty 'layouts' section")
    fits = []
    for layout, entry in sorted(data["layouts"].items()):
        if not (isinstance(layout, str) and layout[:2] in ("tp", "cp") and layout[2:].isdigit()):
            raise SimInputError(f"{fw}: layout {layout!r} must be tp<N> or cp<N>")
        if not isinstance(entry, dict):
            raise SimInputError(f"{fw}: layout {layout!r} must be a mapping of fields")
        for key in entry:
            if key not in _COLLECTIVE_FIELDS:
                raise unknown_field(key, dict.fromkeys(_COLLECTIVE_FIELDS), fw, f"layouts.{layout}")
        f = _Fields({"layouts": data["layouts"]}, fw)
        k = f"layouts.{layout}."
        fits.append(
            CollectiveFit(
                layout=layout,
                shard_scale=f.number(k + "shard_scale", 0.1, 10, low_open=True),
                latency_us=f.number(k + "latency_us", 0, 1e5),
                bandwidth_gb_s=f.number(k + "bandwidth_gb_s", 0, 1e6),
                train_points=f.number(k + "train_points", 0, 1e6, integer=True),
                mape_pct=f.number(k + "mape_pct", 0, 1e6),
                worst_pct=f.number(k + "worst_pct", 0, 1e6),
                max_call_bytes=f.number(k + "max_call_bytes", 0, 1e15) if "max_call_bytes" in entry else 0.0,
            )
        )
    return {"collectives": tuple(fits), "collectives_source": str(data.get("source", fw))}


def _kernel_fits(section, where: str) -> tuple[KernelFit, ...]:
    """The optional `calibration.attention_kernels` mapping: family name -> fitted parameters."""
    if not isinstance(section, dict):
        raise SimInputError(f"{where}: field 'calibration.attention_kernels' must be a mapping of kernel families")
    fits = []
    f = _Fields({"base": None, "calibration": {"attention_kernels": section}}, where)  # no 'base:' hint
    for family in sorted(section):
        k = f"calibration.attention_kernels.{family}."
        fits.append(
            KernelFit(
                family=str(family),
                bound=f.text(k + "bound", _KERNEL_BOUNDS),
                overhead_us=f.number(k + "overhead_us", *_COST_BOUNDS),
                bandwidth_efficiency=f.fraction(k + "bandwidth_efficiency"),
                unpack_ps_per_kv_element=f.number(k + "unpack_ps_per_kv_element", *_COST_BOUNDS),
                dot_ps_per_q_element=f.number(k + "dot_ps_per_q_element", *_COST_BOUNDS),
                **_grid_fields(section[family], f, k, where),
            )
        )
    return tuple(fits)


def _grid_fields(entry, f: _Fields, k: str, where: str) -> dict:
    """The optional launch-grid fields of one fitted family (absent: no grid terms)."""
    if not isinstance(entry, dict) or "grid" not in entry:
        return {}
    out = dict(
        grid=f.text(k + "grid", GRIDS),
        program_us=f.number(k + "program_us", *_COST_BOUNDS),
        programs_per_sm=f.number(k + "programs_per_sm", 0, 1024, integer=True),
        nosplit_bandwidth_efficiency=f.number(k + "nosplit_bandwidth_efficiency", 0, 1),
    )
    if 0 < out["nosplit_bandwidth_efficiency"] < MIN_EFFICIENCY:
        out["nosplit_bandwidth_efficiency"] = f.fraction(k + "nosplit_bandwidth_efficiency")  # raises
    if isinstance(entry, dict) and "split_overhead_us" in entry:
        out["split_overhead_us"] = f.number(k + "split_overhead_us", *_COST_BOUNDS)
    if isinstance(entry, dict) and "split_us_per_split" in entry:
        out["split_us_per_split"] = f.number(k + "split_us_per_split", *_COST_BOUNDS)
    if out["grid"].startswith("kvq"):
        out.update(
            block_tokens=f.number(k + "block_tokens", 1, 1 << 20, integer=True),
            split_waves=f.number(k + "split_waves", 1, 1 << 10, integer=True),
            tail_programs_per_row=f.number(k + "tail_programs_per_row", 0, 1024, integer=True),
        )
        if isinstance(entry, dict) and "resident_programs_per_sm" in entry:
            out["resident_programs_per_sm"] = f.number(k + "resident_programs_per_sm", 0, 1024, integer=True)
    return out


def load_hardware(name_or_path: str, calibration_fit: Path | None = None, transfer_rules: bool = True) -> Hardware:
    """A GPU or node by exact name (configs/hardware/<name>.yaml) or from a user's YAML path; with
    `calibration_fit`, that fit file instead of the one the GPU file names; `transfer_rules`: apply the fitted
    rules of TRANSFER_RULES_FILE (off only to fit them)."""
    hw = _load(resolve("hardware", name_or_path), fit_file=calibration_fit)[1]
    return with_transfer_rules(hw) if transfer_rules else hw


#: fitted transfer rules (docs/transfer-rules.md), written by `python -m kvq_sim.fitpresets --write`
TRANSFER_RULES_FILE = CONFIG_DIR / "hardware" / "fits" / "transfer-rules.yaml"


def with_transfer_rules(hw: Hardware, rules: dict | None = None) -> Hardware:
    """`hw` with the fitted rules of transfer-rules.yaml whose `gpus` name it, when its calibration is
    transferred (never over a GPU's own measurements): `weight_gemv` sets the weight-GEMV efficiency,
    `collectives` an all-reduce latency per extra GPU for layouts without a measured fit."""
    if hw.calibration.calibrated or not hw.calibration.transferred_from:
        return hw
    if rules is None:
        if not TRANSFER_RULES_FILE.is_file():
            return hw
        rules = read_yaml(TRANSFER_RULES_FILE)
    where = display_path(TRANSFER_RULES_FILE)

    def number(rule: dict, key: str, at: str, low: float, high: float) -> float:
        v = rule.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not low <= v <= high:
            raise SimInputError(f"{where}: {at}.{key} must be in {low:g}..{high:g}, got {v!r}")
        return float(v)

    for name, rule in (rules.get("weight_gemv") or {}).items():
        if hw.name in rule.get("gpus", ()):
            eff = number(rule, "efficiency", f"weight_gemv.{name}", MIN_EFFICIENCY, 1)
            cal = replace(hw.calibration, weight_bandwidth_efficiency=eff, weight_gemv_rule=str(rule["what"]))
            hw = replace(hw, calibration=cal)
    for name, rule in (rules.get("collectives") or {}).items():
        if hw.name in rule.get("gpus", ()):
            hop = number(rule, "hop_latency_us", f"collectives.{name}", 0, 1e4)
            hw = replace(hw, interconnect_hop_latency_us=hop, interconnect_rule=str(rule["what"]))
    return hw


def hardware_names() -> list[str]:
    return names_in("hardware")
