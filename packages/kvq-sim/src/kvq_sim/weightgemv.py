"""Quantized weight-only GEMV efficiency: the measured ratio of an int8 / int4 kernel's weight streaming to
the fp16 GEMV's, per token count, read from the fit file that `kvq_sim.fitpresets` writes.

A decode step streams quantized weights at weight_gemv_efficiency * ratio(kernel, tokens). The ratio is
taken against the fp16 GEMV of the same benchmark run (same shapes, same L2 flushing), so what it carries
is the kernel's dequantization cost, not the harness; on the measured GPU it is "measured", on every other
GPU the same ratio is applied to that GPU's fp16 GEMV efficiency ("transferred (rule)",
docs/transfer-rules.md). E.g. int4 tinygemm at 1 token on the H100: 107.5 MB in 64.81 us against fp16's
404.8 MB in 164.27 us, ratio (107.5 / 64.81) / (404.8 / 164.27) = 0.673.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .configs import CONFIG_DIR, display_path, read_yaml
from .errors import SimInputError

FIT_FILE = CONFIG_DIR / "hardware" / "fits" / "h100-80g-weight-gemv.yaml"
#: kernels a WeightScheme can name (its `gemv_kernel`); "" streams at the fp16 GEMV efficiency
KERNELS = ("int8", "int4")
DEQUANT = ("fused", "separate")


@dataclass(frozen=True)
class KernelRatio:
    """One quantized kernel's measured streaming rate relative to fp16, at the token counts measured."""

    kernel: str
    what: str  # the kernel as benchmarked, e.g. "torch._weight_int4pack_mm (tinygemm), group 128"
    dequant: str  # "fused" (inside the GEMV) or "separate" (a dequantize pass, then the 16-bit GEMM)
    tokens: tuple[int, ...]  # ascending
    ratio: tuple[float, ...]  # (quantized bytes / time) / (fp16 bytes / time) at each token count

    def at(self, tokens):
        """The ratio at `tokens` (int or numpy array): linear in log2(tokens) between measured counts, the
        nearest measured one outside them. E.g. int4 0.6733 at 1 token and 0.307 at 8: at 3 tokens
        0.6733 + (0.307 - 0.6733) * log2(3) / log2(8) = 0.4798; at 256 tokens the 64-token ratio."""
        import numpy as np

        x = np.log2(np.maximum(np.asarray(tokens, dtype=float), 1.0))
        r = np.interp(x, [math.log2(t) for t in self.tokens], self.ratio)
        return float(r) if np.ndim(r) == 0 else r


@dataclass(frozen=True)
class WeightGemvFit:
    """The fit file: which GPU measured the kernels, from which measurements, and each kernel's ratios."""

    measured_on: str  # kvq-sim hardware name of the measured GPU
    torch_device_name: str  # its torch.cuda.get_device_name(): GPUs reporting it count as measured
    source: str
    kernels: tuple[KernelRatio, ...]

    def kernel(self, name: str) -> KernelRatio:
        for k in self.kernels:
            if k.kernel == name:
                return k
        raise SimInputError(f"no measured weight GEMV kernel {name!r}; measured: {', '.join(self.names)}")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(k.kernel for k in self.kernels)


def _positive(v, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise SimInputError(f"{where} must be a number > 0, got {v!r}")
    return float(v)


def parse_fit(data: dict, where: str) -> WeightGemvFit:
    """The fit file's mapping, validated: every kernel a known one, token counts ascending positive integers,
    ratios in (0, 2] (a quantized kernel streaming more than twice fp16's rate would be a broken measurement)."""
    for key in ("measured_on", "torch_device_name", "source", "kernels"):
        if key not in data:
            raise SimInputError(f"{where}: missing field '{key}'")
    if not isinstance(data["kernels"], dict) or not data["kernels"]:
        raise SimInputError(f"{where}: kernels must be a mapping of kernel -> {{what, ratio_to_fp16}}")
    out = []
    for name, entry in data["kernels"].items():
        at = f"{where}: kernels.{name}"
        if name not in KERNELS:
            raise SimInputError(f"{at}: unknown kernel; valid: {', '.join(KERNELS)}")
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("ratio_to_fp16"), dict)
            or not entry["ratio_to_fp16"]
        ):
            raise SimInputError(f"{at}: needs ratio_to_fp16, a mapping of token count -> ratio")
        pairs = []
        for t, r in entry["ratio_to_fp16"].items():
            if isinstance(t, bool) or not isinstance(t, int) or t < 1:
                raise SimInputError(f"{at}.ratio_to_fp16: token count must be a positive integer, got {t!r}")
            r = _positive(r, f"{at}.ratio_to_fp16.{t}")
            if r > 2:
                raise SimInputError(f"{at}.ratio_to_fp16.{t}: ratio {r:g} is above 2")
            pairs.append((t, r))
        pairs.sort()
        if entry.get("dequant") not in DEQUANT:
            raise SimInputError(f"{at}: dequant must be one of {', '.join(DEQUANT)}, got {entry.get('dequant')!r}")
        out.append(KernelRatio(name, str(entry.get("what", "")), entry["dequant"], tuple(t for t, _ in pairs),
                               tuple(r for _, r in pairs)))  # fmt: skip
    return WeightGemvFit(str(data["measured_on"]), str(data["torch_device_name"]), str(data["source"]), tuple(out))


@lru_cache(maxsize=4)
def load_fit(path: Path = FIT_FILE) -> WeightGemvFit:
    return parse_fit(read_yaml(path), display_path(path))


def ratio(kernel: str, tokens):
    """Quantized / fp16 weight-streaming ratio of `kernel` at `tokens` per GEMV (the decode batch)."""
    return load_fit().kernel(kernel).at(tokens)


def dequant(kernel: str) -> str:
    """How the measured kernel dequantizes: "fused" or "separate"."""
    return load_fit().kernel(kernel).dequant


def source(kernel: str, gpu: str, torch_device_name: str | None) -> str:
    """Where a kernel's ratio comes from on `gpu`: measured there, or transferred by the ratio rule."""
    fit = load_fit()
    k = fit.kernel(kernel)
    pts = ", ".join(f"{r:.3f} at {t}" for t, r in zip(k.tokens, k.ratio))
    if torch_device_name is not None and torch_device_name == fit.torch_device_name:
        return f"measured on {fit.measured_on} ({k.what}: x{pts} tokens of the fp16 GEMV rate)"
    return f"transferred (rule: ratio to the fp16 GEMV) from {fit.measured_on} ({k.what}: x{pts} tokens)"
