"""Serving-engine presets: the named fixed costs (per request, prefill, decode step, layer launch) and memory
reserve of a serving stack, read from configs/engines/engines.yaml and the fitted values in its fit file."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from functools import lru_cache
from pathlib import Path

from .configs import CONFIG_DIR, display_path, read_yaml, unknown_field
from .errors import SimInputError

ENGINES_FILE = CONFIG_DIR / "engines" / "engines.yaml"
ENGINE_FIT_FILE = CONFIG_DIR / "engines" / "fits" / "engines-fit.yaml"
DEFAULT_ENGINE = "fused"


@dataclass(frozen=True)
class Engine:
    """One engine's overheads, each in the unit its name carries; all zero is kvq-sim's fused roofline.

    E.g. a decode step of a 32-layer model under an engine with layer_launch_us 400 and step_overhead_us 50
    costs the roofline step + (32 * 400 + 50) us = + 12.85 ms.
    """

    name: str
    description: str
    source: str
    request_overhead_ms: float = 0.0
    prefill_overhead_ms: float = 0.0
    step_overhead_us: float = 0.0
    layer_launch_us: float = 0.0
    memory_reserve_fraction: float = 0.0
    kv_block_tokens: int = 1
    separate_dequant: bool = False
    fitted: tuple[str, ...] = ()  # fields fitted on calibration points (their values come from the fit file)
    fit_sources: tuple[str, ...] = ()  # the calibration-part sources they were fitted on

    def step_s(self, layers: int) -> float:
        """Engine time added to one decode step of a `layers`-layer model (per GPU)."""
        return (layers * self.layer_launch_us + self.step_overhead_us) * 1e-6

    def prefill_s(self, layers: int) -> float:
        """Engine time added to the prefill of one sequence: its fixed cost and one forward pass of launches."""
        return self.prefill_overhead_ms * 1e-3 + layers * self.layer_launch_us * 1e-6

    @property
    def is_fused(self) -> bool:
        return self == replace(FUSED, name=self.name, description=self.description, source=self.source)


FUSED = Engine(DEFAULT_ENGINE, "", "")
NUMBERS = {
    "request_overhead_ms": (0.0, 1e5),
    "prefill_overhead_ms": (0.0, 1e5),
    "step_overhead_us": (0.0, 1e7),
    "layer_launch_us": (0.0, 1e6),
    "memory_reserve_fraction": (0.0, 0.9),
}
FIELDS = {f.name for f in fields(Engine)} - {"name", "fitted", "fit_sources"}


def _number(v, key: str, where: str) -> float:
    low, high = NUMBERS[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not low <= v <= high:
        raise SimInputError(f"{where}: {key} must be a number in {low:g}..{high:g}, got {v!r}")
    return float(v)


def parse_engine(name: str, entry, where: str, fit: dict | None = None) -> Engine:
    """One engine entry (and its fitted values) as an Engine; a bad or unknown field is a SimInputError."""
    at = f"{where}: engines.{name}"
    if not isinstance(entry, dict):
        raise SimInputError(f"{at}: expected a mapping of fields")
    kw: dict = {}
    for key, v in entry.items():
        if key == "fitted":
            continue
        if key not in FIELDS:
            raise unknown_field(key, FIELDS | {"fitted"}, at)
        if key in NUMBERS:
            kw[key] = _number(v, key, at)
        elif key == "kv_block_tokens":
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 4096:
                raise SimInputError(f"{at}: kv_block_tokens must be an integer in 1..4096, got {v!r}")
            kw[key] = v
        elif key == "separate_dequant":
            if not isinstance(v, bool):
                raise SimInputError(f"{at}: separate_dequant must be true or false, got {v!r}")
            kw[key] = v
        else:
            kw[key] = str(v)
    fitted = entry.get("fitted", {}) or {}
    if not isinstance(fitted, dict) or any(k not in NUMBERS for k in fitted):
        raise SimInputError(f"{at}: fitted must map numeric fields ({', '.join(NUMBERS)}) to calibration sources")
    sources = sorted({s for v in fitted.values() for s in (v or ())})
    for key in fitted:
        if fit is None or key not in (fit.get(name) or {}):
            raise SimInputError(f"{at}: {key} is fitted but the fit file has no value for it (run fitpresets)")
        kw[key] = _number(fit[name][key], key, f"{display_path(ENGINE_FIT_FILE)}: engines.{name}")
    for key in ("description", "source"):
        if not kw.get(key):
            raise SimInputError(f"{at}: {key} is missing")
    return Engine(name=name, fitted=tuple(fitted), fit_sources=tuple(sources), **kw)


def read_engines(path: Path = ENGINES_FILE, fit: dict | None = None) -> dict[str, Engine]:
    """Every preset of an engines file; fit: {engine: {field: value}} (default: the committed fit file)."""
    data = read_yaml(path)
    where = display_path(path)
    if set(data) != {"engines"} or not isinstance(data["engines"], dict) or not data["engines"]:
        raise SimInputError(f"{where}: expected one field 'engines', a mapping of engine name -> fields")
    if DEFAULT_ENGINE not in data["engines"]:
        raise SimInputError(f"{where}: the default engine '{DEFAULT_ENGINE}' is missing")
    if fit is None:
        fit = read_yaml(ENGINE_FIT_FILE).get("engines", {}) if ENGINE_FIT_FILE.is_file() else {}
    return {name: parse_engine(name, entry, where, fit) for name, entry in data["engines"].items()}


@lru_cache(maxsize=1)
def _engines() -> dict[str, Engine]:
    return read_engines()


def engine_names() -> list[str]:
    return list(_engines())


def get_engine(name: str | Engine | None) -> Engine:
    """A preset by exact name (None: the default); an unknown name lists the valid ones."""
    if isinstance(name, Engine):
        return name
    engines = _engines()
    name = DEFAULT_ENGINE if name is None else name
    if name not in engines:
        raise SimInputError(f"unknown engine {name!r}; valid: {', '.join(engines)}")
    return engines[name]
