"""GPU and node descriptions (configs/hardware/*.yaml): load, validate once, and expose as frozen dataclasses."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .configs import CONFIG_DIR, display_path, names_in, read_yaml, resolve
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
    efficiency is nosplit_bandwidth_efficiency for a launch that does not split the context (when set).
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
    program_us: float = 0.0  # fixed time per program per SM (prologue, partial write, combine share)
    programs_per_sm: int = 0  # resident programs per SM for the wave-tail factor; 0: not modelled
    nosplit_bandwidth_efficiency: float = 0.0  # efficiency of launches that do not split; 0: same as split


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

    def positive(self, key: str, *, upper: float = float("inf"), integer: bool = False) -> float:
        v = self._get(key)
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= upper
        if ok and integer and not float(v).is_integer():
            ok = False
        if not ok:
            kind = "a positive integer" if integer else "a positive number"
            bound = f" <= {upper:g}" if upper != float("inf") else ""
            raise SimInputError(f"{self.where}: field '{key}' must be {kind}{bound}, got {v!r}")
        return int(v) if integer else float(v)

    def fraction(self, key: str) -> float:
        return self.positive(key, upper=1.0)

    def nonnegative(self, key: str) -> float:
        v = self._get(key)
        if not (isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0):
            raise SimInputError(f"{self.where}: field '{key}' must be a number >= 0, got {v!r}")
        return float(v)

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


def _merged(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """The file's fields over those of its `base:` GPU (node files name the GPU they are made of)."""
    data = read_yaml(path)
    base = data.get("base")
    if base is None:
        return data
    if not isinstance(base, str):
        raise SimInputError(f"{display_path(path)}: field 'base' must be a GPU name, got {base!r}")
    base_path = resolve("hardware", base) if "/" in base or base.endswith(".yaml") else _named(base, path)
    if base_path in seen:
        raise SimInputError(f"{display_path(path)}: field 'base' forms a cycle through {base!r}")
    parent = _merged(base_path, (*seen, path))
    merged = {**parent, **{k: v for k, v in data.items() if k not in ("base", "calibration")}}
    merged["calibration"] = {**parent.get("calibration", {}), **data.get("calibration", {})}
    if "bandwidth_efficiency" in data.get("calibration", {}):
        merged["calibration"]["bandwidth_efficiency"] = {
            **parent.get("calibration", {}).get("bandwidth_efficiency", {}),
            **data["calibration"]["bandwidth_efficiency"],
        }
    return merged


def _named(base: str, referrer: Path) -> Path:
    """A `base:` GPU next to the referring file, else among the shipped configs."""
    for p in (referrer.parent / f"{base}.yaml", CONFIG_DIR / "hardware" / f"{base}.yaml"):
        if p.is_file():
            return p
    raise SimInputError(
        f"{display_path(referrer)}: field 'base' names unknown GPU {base!r}; valid: {', '.join(hardware_names())}"
    )


def parse_hardware(data: dict, where: str, name: str) -> Hardware:
    """Validate a hardware mapping (already merged with its base) into a Hardware."""
    f = _Fields(data, where)
    cal = Calibration(
        calibrated=f.boolean("calibration.calibrated"),
        source=f.text("calibration.source"),
        **{attr: f.fraction(f"calibration.bandwidth_efficiency.{key}") for key, attr in _CAL_KEYS.items()},
        tensor_core_efficiency=f.fraction("calibration.tensor_core_efficiency"),
        interconnect_efficiency=f.fraction("calibration.interconnect_efficiency"),
        kernel_launch_overhead_us=f.nonnegative("calibration.kernel_launch_overhead_us"),
        cuda_context_mib=f.nonnegative("calibration.cuda_context_mib"),
        framework_workspace_mib=f.nonnegative("calibration.framework_workspace_mib"),
        attention_kernels=_kernel_fits(data.get("calibration", {}).get("attention_kernels", {}), where),
        transferred_from=f.text("calibration.transferred_from")
        if "transferred_from" in data.get("calibration", {})
        else "",
    )
    hw = Hardware(
        name=name,
        description=f.text("description"),
        source_file=where,
        gpus=int(f.positive("gpus", upper=1024, integer=True)),
        nominal_memory_gib=f.positive("nominal_memory_gib", upper=1 << 16),
        usable_memory_bytes=int(f.positive("usable_memory_bytes", upper=1 << 46, integer=True)),
        hbm_bandwidth_gb_s=f.positive("hbm_bandwidth_gb_s", upper=1e6),
        fp16_dense_tflops=f.positive("fp16_dense_tflops", upper=1e6),
        int8_dense_tops=f.positive("int8_dense_tops", upper=1e6),
        l2_mib=f.positive("l2_mib", upper=1 << 16),
        sm_count=int(f.positive("sm_count", upper=1 << 16, integer=True)),
        interconnect=f.text("interconnect", _INTERCONNECTS),
        interconnect_bandwidth_gb_s=f.positive("interconnect_bandwidth_gb_s", upper=1e6),
        interconnect_latency_us=f.nonnegative("interconnect_latency_us"),
        calibration=cal,
        torch_device_name=f.text("torch_device_name") if "torch_device_name" in data else None,
        boost_clock_mhz=f.positive("boost_clock_mhz", upper=1e4) if "boost_clock_mhz" in data else None,
    )
    if hw.reserve_bytes >= hw.usable_memory_bytes:
        raise SimInputError(f"{where}: calibration reserve ({hw.reserve_bytes / GIB:.2f} GiB) exceeds usable memory")
    return hw


def _kernel_fits(section, where: str) -> tuple[KernelFit, ...]:
    """The optional `calibration.attention_kernels` mapping: family name -> fitted parameters."""
    if not isinstance(section, dict):
        raise SimInputError(f"{where}: field 'calibration.attention_kernels' must be a mapping of kernel families")
    fits = []
    for family in sorted(section):
        f = _Fields(section, f"{where} (calibration.attention_kernels)")
        k = f"{family}."
        fits.append(
            KernelFit(
                family=str(family),
                bound=f.text(k + "bound", _KERNEL_BOUNDS),
                overhead_us=f.nonnegative(k + "overhead_us"),
                bandwidth_efficiency=f.fraction(k + "bandwidth_efficiency"),
                unpack_ps_per_kv_element=f.nonnegative(k + "unpack_ps_per_kv_element"),
                dot_ps_per_q_element=f.nonnegative(k + "dot_ps_per_q_element"),
                **_grid_fields(section[family], f, k, where),
            )
        )
    return tuple(fits)


def _grid_fields(entry, f: _Fields, k: str, where: str) -> dict:
    """The optional launch-grid fields of one fitted family (absent: no grid terms, as before them)."""
    if not isinstance(entry, dict) or "grid" not in entry:
        return {}
    out = dict(
        grid=f.text(k + "grid", GRIDS),
        program_us=f.nonnegative(k + "program_us"),
        programs_per_sm=int(f.nonnegative(k + "programs_per_sm")),
        nosplit_bandwidth_efficiency=f.nonnegative(k + "nosplit_bandwidth_efficiency"),
    )
    if out["nosplit_bandwidth_efficiency"] > 1:
        raise SimInputError(
            f"{where}: field 'calibration.attention_kernels.{k}nosplit_bandwidth_efficiency' must be <= 1"
        )
    if out["grid"].startswith("kvq"):
        out.update(
            block_tokens=int(f.positive(k + "block_tokens", upper=1 << 20, integer=True)),
            split_waves=int(f.positive(k + "split_waves", upper=1 << 10, integer=True)),
            tail_programs_per_row=int(f.nonnegative(k + "tail_programs_per_row")),
        )
    return out


def load_hardware(name_or_path: str) -> Hardware:
    """A GPU or node by exact name (configs/hardware/<name>.yaml) or from a user's YAML path."""
    path = resolve("hardware", name_or_path)
    where = display_path(path)
    return parse_hardware(_merged(path), where, path.stem)


def hardware_names() -> list[str]:
    return names_in("hardware")
