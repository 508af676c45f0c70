"""What is being sized: a model on some GPUs with a KV format, weight precision and parallelism, validated once."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Literal

from kvq_core.formats import (
    DEFAULT_METHOD_FOR_BITS,
    METHODS,
    KVFormat,
    bits_label,
    get_format,
    parse_bits,
    stream_bytes,
)

from .engines import Engine, get_engine
from .errors import SimInputError
from .hardware import Hardware, load_hardware
from .models import ModelShape, load_model
from .recipes import ACTIVATION_BITS, WEIGHT_SCHEMES, WeightScheme

ParallelMode = Literal["tp", "cp"]
PrefixReads = Literal["per-sequence", "shared"]
WEIGHT_BITS = (16, 8, 4, 2)
# 2048 tokens per prefill chunk: a common chunked-prefill serving budget; an assumption the CLI prints.
DEFAULT_PREFILL_CHUNK_TOKENS = 2048


#: the methods a bare --bits picks: fp16 at 16 bits, KIVI at the widths it has (2, 3, 4, 8); any other
#: width is stored by a method the user names, never one picked for them
BARE_BITS_METHODS = ("fp16", DEFAULT_METHOD_FOR_BITS)


def resolve_method(method: str | None, bits: str | float | None) -> tuple[str, tuple[float, float], KVFormat]:
    """(method, (key_bits, value_bits), format) from CLI-style inputs; a bare bits picks fp16 or KIVI only."""
    try:
        if bits is not None and not all(map(math.isfinite, parse_bits(bits))):
            raise SimInputError(f"cannot read bits {bits!r}: not a finite number")
        if method is None and bits is not None:
            method = _bare_bits_method(parse_bits(bits), bits)
        method = "fp16" if method is None else method
        if method not in METHODS:
            raise SimInputError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
        fmt = get_format(method, bits)
        kv = METHODS[method].default_bits if bits is None else parse_bits(bits)
    except SimInputError:
        raise
    except ValueError as e:
        raise SimInputError(str(e)) from None
    return method, kv, fmt


def _bare_bits_method(kv: tuple[float, float], bits) -> str:
    for name in BARE_BITS_METHODS:
        if kv in METHODS[name].bits:
            return name
    storing = [n for n, spec in METHODS.items() if kv in spec.bits]
    if kv == (0, 0):
        raise SimInputError(
            f"--bits {bits} stores no KV: it is eviction, not quantization; name the eviction method "
            f"(--method {' or --method '.join(storing)})"
        )
    if not storing:
        valid = sorted({bits_label(b) for s in METHODS.values() for b in s.bits}, key=lambda x: (len(x), x))
        raise SimInputError(f"no method stores {bits_label(kv)}-bit KV; valid bits: {', '.join(valid)}")
    raise SimInputError(
        f"--bits {bits} is not a width of {DEFAULT_METHOD_FOR_BITS} (the default method): name the method that "
        f"stores {bits_label(kv)}-bit KV with --method ({', '.join(storing)})"
    )


@dataclass(frozen=True)
class Deployment:
    """A model served on `gpus` GPUs of one kind, KV stored as `kv_format`, weights at `weight_bits`.

    tp: tensor parallel splits attention heads, MLP columns/rows and the vocabulary across GPUs; KV heads
        are replicated when gpus > num_key_value_heads (each GPU keeps one).
    cp: context parallel splits each sequence's tokens across GPUs; weights are replicated.
    """

    model: ModelShape
    hardware: Hardware
    method: str
    kv_bits: tuple[float, float]
    kv_format: KVFormat
    weight_bits: int = 16
    gpus: int = 1
    parallel: ParallelMode = "tp"
    prefill_chunk_tokens: int = DEFAULT_PREFILL_CHUNK_TOKENS
    weight_scheme: WeightScheme | None = None  # None: the --weight-bits preset (recipes.WEIGHT_SCHEMES)
    activation_bits: int = 16  # 8 or 4: GEMMs at the INT8 tensor-core peak
    shared_prefix_tokens: int = 0  # of each sequence's context, one prefix stored once per GPU (SCBench)
    prefix_reads: PrefixReads = "per-sequence"  # decode attention reads the prefix per sequence or once
    engine: Engine | None = None  # serving-engine overheads (kvq_sim.engines); None: the fused roofline alone

    def __post_init__(self) -> None:
        m = self.model
        if self.weight_bits not in WEIGHT_BITS:
            raise SimInputError(
                f"weight bits must be one of {', '.join(map(str, WEIGHT_BITS))}, got {self.weight_bits}"
            )
        if self.weight_scheme is not None and self.weight_scheme.bits != self.weight_bits:
            raise SimInputError(f"weight scheme is {self.weight_scheme.bits}-bit, weight_bits {self.weight_bits}")
        if self.activation_bits not in ACTIVATION_BITS:
            raise SimInputError(
                f"activation bits must be one of {', '.join(map(str, ACTIVATION_BITS))}, got {self.activation_bits}"
            )
        if self.shared_prefix_tokens < 0:
            raise SimInputError(f"shared prefix must be >= 0 tokens, got {self.shared_prefix_tokens}")
        if self.prefix_reads not in ("per-sequence", "shared"):
            raise SimInputError(f"prefix reads must be 'per-sequence' or 'shared', got {self.prefix_reads!r}")
        if self.parallel not in ("tp", "cp"):
            raise SimInputError(f"parallel must be 'tp' or 'cp', got {self.parallel!r}")
        if not (isinstance(self.gpus, int) and not isinstance(self.gpus, bool) and 1 <= self.gpus <= 1024):
            raise SimInputError(f"gpus must be in 1..1024, got {self.gpus}")
        if self.hardware.gpus > 1 and self.gpus > self.hardware.gpus:
            raise SimInputError(f"{self.hardware.name} has {self.hardware.gpus} GPUs, asked for {self.gpus}")
        if not 1 <= self.prefill_chunk_tokens <= 1 << 20:
            raise SimInputError(f"prefill chunk must be in 1..{1 << 20} tokens, got {self.prefill_chunk_tokens}")
        if self.tp > 1:
            h, kv = m.num_attention_heads, m.num_key_value_heads
            if h % self.tp or (kv % self.tp and self.tp % kv):
                raise SimInputError(
                    f"tensor parallel {self.tp} does not divide {m.name}'s {h} heads / {kv} KV heads "
                    f"(needs heads % tp == 0 and kv_heads % tp == 0 or tp % kv_heads == 0)"
                )
        f = self.kv_format
        try:  # a layout that does not fit the model's heads (e.g. PQ subspaces that do not divide head_dim), at a
            # length beyond every fp16 window so that the quantized layout is what is checked
            if getattr(f, "cache_input", "kv") == "kv":
                for stream in (f.key, f.value):
                    stream_bytes(stream, 1 << 16, self.kv_heads_per_gpu, m.head_dim, f.sink_tokens)
        except ValueError as e:
            raise SimInputError(f"{self.method} cannot store {m.name}'s KV: {e}") from None

    @property
    def tp(self) -> int:
        return self.gpus if self.parallel == "tp" else 1

    @property
    def cp(self) -> int:
        return self.gpus if self.parallel == "cp" else 1

    @property
    def heads_per_gpu(self) -> int:
        return self.model.num_attention_heads // self.tp

    @property
    def kv_heads_per_gpu(self) -> int:
        """KV heads each GPU stores: kv/tp, or 1 (replicated) when tp > kv heads."""
        return max(1, self.model.num_key_value_heads // self.tp)

    @property
    def weights(self) -> WeightScheme:
        """How the linear weights are stored: the recipe's scheme, else the --weight-bits preset."""
        return self.weight_scheme or WEIGHT_SCHEMES[self.weight_bits]

    @cached_property
    def cache_cap(self) -> tuple[int, str] | None:
        """(tokens, why) when a sequence's cache stops growing with the context: the model's sliding window,
        or the format's eviction budget (sinks + recent window + heavy hitters: H2O keeps 2,176); else None."""
        window = self.model.sliding_window
        evicted = self.kv_format.stored_tokens(1 << 62)  # tokens an evicting format keeps of an endless context
        caps = [(window, "sliding window")] if window is not None else []
        if evicted < 1 << 62:
            caps.append((evicted, f"{self.method} eviction"))
        return min(caps) if caps else None

    def prefix_tokens(self, context: int) -> int:
        """Tokens of a `context`-token sequence that belong to the shared prefix (at most the context)."""
        return min(self.shared_prefix_tokens, context)

    @property
    def bits_label(self) -> str:
        return bits_label(self.kv_bits)

    def with_method(self, method: str, bits: str | float | None = None) -> Deployment:
        """The same deployment with another KV method (used for the fp16 baseline)."""
        name, kv, fmt = resolve_method(method, bits)
        return replace(self, method=name, kv_bits=kv, kv_format=fmt)


def deployment(
    model: str | ModelShape,
    gpu: str | Hardware,
    bits: str | float | None = None,
    method: str | None = None,
    weight_bits: int = 16,
    gpus: int | None = None,
    parallel: str = "tp",
    *,
    weight_scheme: WeightScheme | None = None,
    activation_bits: int = 16,
    shared_prefix_tokens: int = 0,
    prefix_reads: str = "per-sequence",
    engine: str | Engine | None = None,
) -> Deployment:
    """Build a validated Deployment from names (or loaded configs) as the CLI takes them."""
    shape = model if isinstance(model, ModelShape) else load_model(model)
    hw = gpu if isinstance(gpu, Hardware) else load_hardware(gpu)
    name, kv, fmt = resolve_method(method, bits)
    return Deployment(
        shape,
        hw,
        name,
        kv,
        fmt,
        weight_bits,
        hw.gpus if gpus is None else gpus,
        parallel,
        weight_scheme=weight_scheme,
        activation_bits=activation_bits,
        shared_prefix_tokens=shared_prefix_tokens,
        prefix_reads=prefix_reads,
        engine=None if engine is None else get_engine(engine),
    )
