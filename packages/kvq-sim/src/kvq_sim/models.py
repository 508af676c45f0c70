"""Transformer shapes (configs/models/*.yaml or a Hugging Face config.json) and parameter counts from them."""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass

from .configs import display_path, names_in, read_text, read_yaml, resolve, unknown_field
from .errors import SimInputError

#: the largest layer count, width, head count or vocabulary accepted (16.7 M; llama-3-70b's widest is 128,256)
MAX_SHAPE = 1 << 24
#: the longest trained context accepted (17 billion tokens; the planner's own ceiling)
MAX_POSITIONS = 1 << 34
#: every field kvq-sim reads from a model config; a kvq YAML may hold only these
FIELDS = (
    "name", "source", "num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
    "intermediate_size", "vocab_size", "tie_word_embeddings", "sliding_window", "use_sliding_window",
    "num_local_experts", "num_experts", "num_experts_per_tok", "attention_bias", "max_position_embeddings",
)  # fmt: skip


@dataclass(frozen=True)
class Linear:
    """One weight matrix kind of a layer: `count` matrices of shape [out_features, in_features]."""

    name: str
    out_features: int
    in_features: int
    count: int = 1  # experts of a MoE layer store `count` copies
    split: str = "none"  # tensor parallel: "out" (column parallel), "in" (row parallel), "none" (replicated)


@dataclass(frozen=True)
class ModelShape:
    """A decoder-only transformer's shape; field names follow Hugging Face config.json."""

    name: str
    source: str
    num_hidden_layers: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int  # per expert for MoE models
    vocab_size: int
    tie_word_embeddings: bool = False
    sliding_window: int | None = None  # KV tokens kept per layer; None = full attention
    num_local_experts: int = 1
    num_experts_per_tok: int = 1
    attention_bias: bool = False
    max_position_embeddings: int | None = None  # the longest context the model was trained for; None: not stated

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def is_moe(self) -> bool:
        return self.num_local_experts > 1

    def linears(self) -> tuple[Linear, ...]:
        """The weight matrices of one layer, with how tensor parallelism splits each."""
        h, e = self.hidden_size, self.num_local_experts
        mats = [
            Linear("q_proj", self.q_size, h, split="out"),
            Linear("k_proj", self.kv_size, h, split="out"),
            Linear("v_proj", self.kv_size, h, split="out"),
            Linear("o_proj", h, self.q_size, split="in"),
            Linear("gate_proj", self.intermediate_size, h, e, split="out"),
            Linear("up_proj", self.intermediate_size, h, e, split="out"),
            Linear("down_proj", h, self.intermediate_size, e, split="in"),
        ]
        return tuple(mats)

    @property
    def layer_small_params(self) -> int:
        """Per-layer parameters kept in 16 bit and replicated: two RMSNorms, router, qkv bias."""
        router = self.hidden_size * self.num_local_experts if self.is_moe else 0
        bias = (self.q_size + 2 * self.kv_size) if self.attention_bias else 0
        return 2 * self.hidden_size + router + bias

    @property
    def embedding_params(self) -> int:
        """Input embedding plus the LM head unless tied; the final norm is counted here too."""
        tables = 1 if self.tie_word_embeddings else 2
        return tables * self.vocab_size * self.hidden_size + self.hidden_size

    @property
    def linear_params_per_layer(self) -> int:
        return sum(m.out_features * m.in_features * m.count for m in self.linears())

    @property
    def params(self) -> int:
        """Total parameters, computed from the shapes (LLaMA-7B: 6,738,415,616)."""
        per_layer = self.linear_params_per_layer + self.layer_small_params
        return self.num_hidden_layers * per_layer + self.embedding_params

    @property
    def active_params(self) -> int:
        """Parameters a token touches: top-k of the experts (Mixtral-8x7B: 12.9 B of 46.7 B)."""
        if not self.is_moe:
            return self.params
        expert = 3 * self.hidden_size * self.intermediate_size
        idle = (self.num_local_experts - self.num_experts_per_tok) * expert
        return self.params - self.num_hidden_layers * idle

    def kv_tokens(self, context: int) -> int:
        """Tokens a layer's cache holds at `context`: a sliding window caps them."""
        return context if self.sliding_window is None else min(context, self.sliding_window)


def _int(data: dict, key: str, where: str, default: int | None = None, maximum: int = MAX_SHAPE) -> int:
    v = data.get(key, default)
    if v is None and key not in data:
        raise SimInputError(f"{where}: missing field '{key}' (an integer in 1..{maximum:,})")
    if v is None or isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= maximum:
        huge = isinstance(v, int) and abs(v) > 1 << 64  # repr of a 5,000-digit integer raises ValueError
        got = f"a {v.bit_length()}-bit integer" if huge else repr(v)
        raise SimInputError(f"{where}: field '{key}' must be an integer in 1..{maximum:,}, got {got}")
    return v


def _check_fields(data: dict, where: str, strict: bool) -> None:
    """Refuse misspelt fields: any unknown field of a kvq YAML (strict); in a Hugging Face config.json,
    which holds many fields kvq-sim does not read, a field within a typo of one it reads and lacks."""
    for key in data:
        if key in FIELDS:
            continue
        if strict or not isinstance(key, str):
            raise unknown_field(key, FIELDS, where)
        close = difflib.get_close_matches(key, [f for f in FIELDS if f not in data], n=1, cutoff=0.85)
        if close:
            raise SimInputError(f"{where}: unknown field '{key}'; did you mean '{close[0]}'?")


def parse_model(data: dict, where: str, name: str, strict: bool = False) -> ModelShape:
    """Validate a Hugging Face style config mapping into a ModelShape; errors name the file and field."""
    _check_fields(data, where, strict)
    for text in ("name", "source"):
        if not isinstance(data.get(text, ""), str):
            raise SimInputError(f"{where}: field '{text}' must be a string, got {data[text]!r}")
    heads = _int(data, "num_attention_heads", where)
    hidden = _int(data, "hidden_size", where)
    kv = _int(data, "num_key_value_heads", where, default=heads)  # absent = multi-head attention
    head_dim = data.get("head_dim")
    if head_dim is None:
        if hidden % heads:
            raise SimInputError(f"{where}: hidden_size {hidden} is not divisible by num_attention_heads {heads}")
        head_dim = hidden // heads
    head_dim = _int({"head_dim": head_dim}, "head_dim", where)
    if heads % kv:
        raise SimInputError(f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")
    for flag in ("tie_word_embeddings", "attention_bias", "use_sliding_window"):
        if not isinstance(data.get(flag, False), bool):
            raise SimInputError(f"{where}: field '{flag}' must be true or false, got {data[flag]!r}")
    window = data.get("sliding_window")
    if data.get("use_sliding_window") is False:  # Qwen2 configs carry a window they do not use
        window = None
    if window is not None:
        window = _int({"sliding_window": window}, "sliding_window", where)
    experts = _int(data, "num_local_experts", where, default=data.get("num_experts", 1) or 1)
    top_k = _int(data, "num_experts_per_tok", where, default=1 if experts == 1 else None)
    if top_k > experts:
        raise SimInputError(f"{where}: num_experts_per_tok {top_k} exceeds num_local_experts {experts}")
    positions = data.get("max_position_embeddings")
    if positions is not None:
        positions = _int(data, "max_position_embeddings", where, maximum=MAX_POSITIONS)
    return ModelShape(
        name=str(data.get("name", name)),
        source=str(data.get("source", where)),
        num_hidden_layers=_int(data, "num_hidden_layers", where),
        hidden_size=hidden,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=head_dim,
        intermediate_size=_int(data, "intermediate_size", where),
        vocab_size=_int(data, "vocab_size", where),
        tie_word_embeddings=data.get("tie_word_embeddings", False),
        sliding_window=window,
        num_local_experts=experts,
        num_experts_per_tok=top_k,
        attention_bias=data.get("attention_bias", False),
        max_position_embeddings=positions,
    )


def load_model(name_or_path: str) -> ModelShape:
    """A model by exact name (configs/models/<name>.yaml) or a Hugging Face config.json / YAML path."""
    path = resolve("models", name_or_path)
    where = display_path(path)
    if path.suffix == ".json":
        text = read_text(path)
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise SimInputError(f"{where}: line {e.lineno} column {e.colno}: malformed JSON: {e.msg}") from None
        except ValueError as e:  # an integer of more than sys.get_int_max_str_digits() (4300) digits
            raise SimInputError(f"{where}: unreadable value: {str(e).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise SimInputError(f"{where}: expected a JSON object of fields, got {type(data).__name__}")
        name = path.parent.name if path.name == "config.json" else path.stem
        return parse_model(data, where, name)
    return parse_model(read_yaml(path), where, path.stem, strict=True)


def model_names() -> list[str]:
    return names_in("models")
