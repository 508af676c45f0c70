"""Where each term of a decode-step prediction gets its efficiency: measured on this GPU, transferred from a
measured one by a named rule, or a prior. `kvq-sim plan` prints the texts; the report shows the kinds and texts."""

from __future__ import annotations

from dataclasses import dataclass

from .deployment import Deployment
from .engines import Engine
from .latency import applied_gemv_kernel, attention_family, layout
from .weightgemv import source as gemv_source

#: the decode-step terms, in the order `plan` prints them
TERMS = ("weights", "kv_read", "compute", "interconnect", "launch")
#: kinds from strongest to weakest evidence; a term built from several parts takes its weakest part's kind
KINDS = ("measured", "transferred", "prior", "none")


@dataclass(frozen=True)
class TermSource:
    """One term's provenance: `kind` is one of KINDS ("none": the term does not apply, e.g. no interconnect on
    one GPU); `text` says what was used and where it comes from, as `plan` prints it."""

    kind: str
    text: str


def _weakest(*kinds: str) -> str:
    return max(kinds, key=KINDS.index)


def term_provenance(dep: Deployment) -> dict[str, TermSource]:
    """Every term of TERMS with its kind and text; a KV method without a kvq kernel says so."""
    cal, hw = dep.hardware.calibration, dep.hardware
    origin_kind = {"calibrated": "measured", "uncalibrated priors": "prior"}.get(cal.status, "transferred")
    origin = {"calibrated": f"measured on {hw.name}", "uncalibrated priors": "prior (not measured)"}.get(
        cal.status, f"{cal.status} (not measured on {hw.name})"
    )
    # the GEMV efficiency and per-kernel cost are fitted on whole decode steps only: a kernel sweep alone
    # leaves them at the file's priors
    if cal.e2e_measured or not cal.calibrated:
        step_kind, step_origin = origin_kind, origin
    else:
        step_kind, step_origin = "prior", f"prior (no decode-step fit on {hw.name})"
    weights = f"GEMV efficiency {cal.weight_bandwidth_efficiency:.3f}, {step_origin}"
    weights_kind = step_kind
    if cal.weight_gemv_rule:
        weights = f"GEMV efficiency {cal.weight_bandwidth_efficiency:.3f}, transferred (rule: {cal.weight_gemv_rule})"
        weights_kind = "transferred"
    kernel = applied_gemv_kernel(dep)
    if kernel:
        ratio = gemv_source(kernel, hw.name, hw.torch_device_name)
        weights += f"; {dep.weights.name} weights x the {kernel} kernel's ratio, " + ratio
        weights_kind = _weakest(weights_kind, "measured" if ratio.startswith("measured") else "transferred")
    elif dep.weights.gemv_kernel:
        weights += (
            f"; applied to {dep.weights.name} weights as if fp16 (the measured {dep.weights.gemv_kernel} path "
            "dequantizes in a separate pass, which a fused engine does not; a fused kernel is not measured)"
        )
        weights_kind = "prior"
    elif dep.weight_bits != 16 or dep.weight_scheme is not None:
        weights += f"; applied to {dep.weights.name} weights as if fp16 (quantized GEMV not measured)"
        weights_kind = "prior"
    family = attention_family(dep)
    fit = cal.kernel(family) if family else None
    if fit is not None:
        kv = TermSource(origin_kind, f"kernel family {family}, {origin}")
    else:
        what = f"no fitted kernel family {family}" if family else f"no kvq kernel for {dep.method}"
        eff = cal.kv_fp16_bandwidth_efficiency if dep.method == "fp16" else cal.kv_quantized_bandwidth_efficiency
        kv = TermSource("prior", f"{what}: roofline at bandwidth efficiency {eff:.2f} (prior, not a measured kernel)")
    launch = f"{cal.kernel_launch_overhead_us:.2f} us per kernel, {step_origin}"
    if dep.engine is not None:  # the engine's step and layer costs are counted in the launch term
        launch += f"; engine {engine_note(dep.engine)}"
    return {
        "weights": TermSource(weights_kind, weights),
        "kv_read": kv,
        "compute": TermSource("prior", f"tensor-core efficiency {cal.tensor_core_efficiency:.2f} (prior)"),
        "interconnect": _interconnect(dep) if dep.gpus > 1 else TermSource("none", "none (1 GPU)"),
        "launch": TermSource(step_kind, launch),
    }


def term_sources(dep: Deployment) -> dict[str, str]:
    """The texts of `term_provenance`, as `plan` prints them and its JSON carries them."""
    return {k: v.text for k, v in term_provenance(dep).items()}


def engine_note(e: Engine) -> str:
    """The engine preset's overheads with units, and where they come from."""
    parts = [
        f"{v:g} {unit}"
        for v, unit in (
            (e.request_overhead_ms, "ms per request"),
            (e.prefill_overhead_ms, "ms per prefill"),
            (e.step_overhead_us, "us per decode step"),
            (e.layer_launch_us, "us per layer per forward pass"),
        )
        if v
    ]
    if e.memory_reserve_fraction:
        parts.append(f"{e.memory_reserve_fraction:.0%} of memory held back")
    if e.kv_block_tokens > 1:
        parts.append(f"KV in blocks of {e.kv_block_tokens} tokens")
    how = f"fitted on {', '.join(e.fit_sources)} (calibration part)" if e.fitted else e.source
    return f"{e.name}: {', '.join(parts) or 'no overhead beyond the roofline'} ({how}; configs/engines/engines.yaml)"


def collectives_note(dep: Deployment) -> str:
    """Where the collective costs of a multi-GPU plan come from: a measured fit of this layout, or the priors."""
    return _interconnect(dep).text


def _interconnect(dep: Deployment) -> TermSource:
    hw, name = dep.hardware, layout(dep)
    f = hw.collective(name)
    if f is None:
        rule = f"; transferred (rule: {hw.interconnect_rule})" if hw.interconnect_rule else ""
        text = (
            f"collectives: priors ({hw.interconnect_latency_us:g} us per call, datasheet link x "
            f"{hw.calibration.interconnect_efficiency:g}); {name} not measured on {hw.name}{rule}"
        )
        return TermSource("transferred" if hw.interconnect_rule else "prior", text)
    bw = f"{f.bandwidth_gb_s:,.0f} GB/s" if f.bandwidth_gb_s else "per-byte cost not resolved"
    if f.bandwidth_gb_s and f.max_call_bytes:
        bw += f", fitted on calls up to {f.max_call_bytes / 2**20:.2g} MiB (extrapolated beyond)"
    return TermSource(
        "measured", f"collectives: measured {name} fit, {f.latency_us:.1f} us per call, {bw} ({hw.collectives_source})"
    )
