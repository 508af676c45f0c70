"""Weight storage schemes and named serving recipes (weights W bits, activations A bits, KV bits + method).

A recipe changes what the simulator charges outside the KV cache: the bytes of every linear weight (so
max context and batch grow) and the bytes each decode step reads, and with 8-bit activations the GEMMs
run at the GPU's INT8 tensor-core peak (`int8_dense_tops` in the hardware YAML) instead of fp16.

Sources. The seed files hold only the papers' abstracts (W4A8KV4, W2A8KV4, weights + activations + KV
"below 8 bits", W4A4KV4); the layouts below are from the arXiv texts as cited, and every number that
is our assumption rather than the paper's says so in its `note`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import SimInputError
from .weightgemv import KERNELS as GEMV_KERNELS

FP16_BYTES = 2


@dataclass(frozen=True)
class WeightScheme:
    """How one [out_features, in_features] linear weight is stored.

    codes: `bits` per weight, packed (ceil(out * in * bits / 8) bytes).
    group metadata: per group of `group_size` input channels of one output row,
        `group_scale_bytes` + `group_zero_bytes` (a fractional byte is a packed sub-byte field: QServe's
        UINT4 zero is 0.5 B, stored two per byte, ceil over the whole tensor);
    channel metadata: `channel_scale_bytes` per output row (per-channel scales).

    >>> WEIGHT_SCHEMES[4].linear_tensor_bytes(4096, 4096)   # codes, fp16 scales, fp16 zeros (g128)
    (8388608, 262144, 262144)
    >>> QSERVE_W4_G128.linear_tensor_bytes(4096, 4096)      # codes, uint8 s1, uint4 z, fp16 s0 per row
    (8388608, 131072, 65536, 8192)
    """

    name: str
    bits: int
    group_size: int | None = None  # input channels per group; None: no group metadata
    group_scale_bytes: float = 0.0
    group_zero_bytes: float = 0.0
    channel_scale_bytes: int = 0
    citation: str = ""
    # the weight-only GEMV kernel that streams it, as measured by kvq_sim.weightgemv ("int8", "int4");
    # "": no measured kernel, streamed at the fp16 GEMV efficiency
    gemv_kernel: str = ""

    def __post_init__(self) -> None:
        if self.bits not in (16, 8, 4, 2):
            raise SimInputError(f"weight bits must be one of 16, 8, 4, 2, got {self.bits}")
        if self.group_size is not None and self.group_size < 1:
            raise SimInputError(f"weight group size must be >= 1, got {self.group_size}")
        if self.gemv_kernel not in ("", *GEMV_KERNELS):
            raise SimInputError(f"unknown weight GEMV kernel {self.gemv_kernel!r}; valid: {', '.join(GEMV_KERNELS)}")

    def linear_tensor_bytes(self, out_features: int, in_features: int) -> tuple[int, ...]:
        """Bytes of the tensors holding one [out, in] weight; zero-byte tensors are left out."""
        n = out_features * in_features
        tensors = [math.ceil(n * self.bits / 8)]
        if self.group_size is not None:
            groups = out_features * math.ceil(in_features / self.group_size)
            tensors += [math.ceil(groups * self.group_scale_bytes), math.ceil(groups * self.group_zero_bytes)]
        tensors.append(out_features * self.channel_scale_bytes)
        return tuple(t for t in tensors if t)

    def avg_bits(self, out_features: int, in_features: int) -> float:
        """Stored bits per weight, metadata included (QServe g128 at 4096 x 4096: 4.098)."""
        return 8 * sum(self.linear_tensor_bytes(out_features, in_features)) / (out_features * in_features)


#: --weight-bits presets. 8 bits: per-row fp16 scale (LLM.int8 / SmoothQuant W8 convention); 4 and 2
#: bits: groups of 128 input channels with fp16 scale and zero (GPTQ/AWQ default, arXiv:2210.17323 sec. 5,
#: arXiv:2306.00978 sec. 4; GPTQ states its 2-bit results with the same grouping).
WEIGHT_SCHEMES: dict[int, WeightScheme] = {
    16: WeightScheme("fp16", 16),
    8: WeightScheme("int8, per-row fp16 scale", 8, channel_scale_bytes=FP16_BYTES, gemv_kernel="int8"),
    4: WeightScheme("int4, group 128 fp16 scale+zero", 4, 128, FP16_BYTES, FP16_BYTES, gemv_kernel="int4"),
    2: WeightScheme("int2, group 128 fp16 scale+zero", 2, 128, FP16_BYTES, FP16_BYTES),
}

# QServe (Lin et al., arXiv:2405.04532) sec. 4.1 "Progressive group quantization": weights are first
# quantized to int8 with per-output-channel fp16 scales s0, then the int8 values to uint4 per group of 128
# with uint8 scales s1 and uint4 zeros. g128 is the grouped variant it evaluates beside per-channel W4A8
# (section/table numbers are from the arXiv v2 text and should be checked before they are quoted).
QSERVE_W4_G128 = WeightScheme(
    "QServe progressive: uint4, g128 uint8 scale + uint4 zero, per-row fp16 scale",
    4,
    128,
    group_scale_bytes=1,
    group_zero_bytes=0.5,
    channel_scale_bytes=FP16_BYTES,
    citation="QServe arXiv:2405.04532 sec. 4.1",
)


@dataclass(frozen=True)
class Recipe:
    """A named serving configuration: weight scheme, activation bits and a kvq-core KV method at its bits."""

    name: str
    weights: WeightScheme
    activation_bits: int
    kv_method: str
    kv_bits: str
    citation: str
    note: str = ""
    needs_training: bool = False

    def __post_init__(self) -> None:
        if self.activation_bits not in ACTIVATION_BITS:
            raise SimInputError(f"activation bits must be one of 16, 8, 4, got {self.activation_bits}")

    @property
    def label(self) -> str:
        return f"W{self.weights.bits}A{self.activation_bits}KV{self.kv_bits}"


#: activation precisions a recipe may declare. A8 and A4 GEMMs are costed at the INT8 tensor-core peak:
#: H100 has no INT4 tensor cores, so A4 gains nothing over A8 there (a conservative choice on A100).
ACTIVATION_BITS = (16, 8, 4)
TRAINING_NOTE = "costed by bit widths only (needs training)"

RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in [
        Recipe(
            "qserve-w4a8kv4",
            QSERVE_W4_G128,
            8,
            "int",
            "4",
            "QServe / QoQ (Lin et al., arXiv:2405.04532): weights sec. 4.1 (progressive group quantization), "
            "A8 per-token int8, KV4 per-head dynamic asymmetric (sec. 5, KV4 attention)",
            "KV4 costed as kvq's `int` 4-bit format (per token per head, fp16 scale + zero); SmoothAttention "
            "and weight reordering change no bytes",
        ),
        Recipe(
            "accllm-w2a8kv4",
            WEIGHT_SCHEMES[2],
            8,
            "int",
            "4",
            "AccLLM: Accelerating Long-Context LLM Inference Via Algorithm-Hardware Co-Design (W2A8KV4, "
            "abstract; shared/seeds/002)",
            "ASSUMED: weight group 128 with fp16 scale + zero and KV4 per token per head (kvq `int` 4); the "
            "seed holds only the abstract. Its pruning and Lambda-shaped attention are not modelled",
        ),
        Recipe(
            "edgeqat-w4a4kv4",
            WEIGHT_SCHEMES[4],
            4,
            "int",
            "4",
            "EdgeQAT (Shen et al., arXiv:2402.10787): weights, activations and KV quantized below 8 bits",
            "bit widths to check against the paper's tables; quantization-aware training not simulated",
            needs_training=True,
        ),
        Recipe(
            "roste-w4a4kv4",
            WEIGHT_SCHEMES[4],
            4,
            "int",
            "4",
            "RoSTE (Wei et al., arXiv:2502.09003): rotated straight-through-estimator QA-SFT at W4A4KV4",
            "rotation is absorbed into the weights (no extra bytes); QA-SFT not simulated",
            needs_training=True,
        ),
    ]
}


def get_recipe(name: str) -> Recipe:
    """A recipe by exact name; an unknown name lists the valid ones."""
    if name not in RECIPES:
        raise SimInputError(f"unknown recipe {name!r}; valid: {', '.join(RECIPES)}")
    return RECIPES[name]
