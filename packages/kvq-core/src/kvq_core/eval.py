"""Perplexity of a causal LM whose attention reads K/V through a given transformers `Cache`.

Two protocols, both over consecutive non-overlapping windows of a token sequence starting at `start`:

teacher-forced (`teacher_forced_perplexity`), window W, prefix P (default 1), chunk C (default 1):
    the first P tokens of a window go through the cache in one forward (the prefill), then the
    remaining tokens 1 chunk of C at a time, each chunk attending over the cache, which holds every
    earlier token of the window as the method stores it. Every position 0..W-2 is scored on the next
    token: W-1 predictions per window, exactly the predictions of one cache-free forward over the
    window. With P = C = 1 every prediction after the first reads all earlier tokens from the cache;
    with C > 1 the tokens within a chunk see each other as the cache's `update` returns them (usually
    in full precision, as in a real chunked prefill); the prefill's own positions likewise.

decode (`decode_perplexity`, `decode_windows`), prefill P (default 384), scored S (default 128):
    a window is P + S tokens; the first P go through the cache in one forward (in full precision
    for transformers' caches, which quantize after the prefill attends), then tokens P..P+S-2 are fed
    one at a time. Scored: the S predictions of tokens P..P+S-1, i.e. the prefill's last position and
    the S-1 decode steps, every decode step reading all earlier tokens from the cache.

Batches (`decode_windows`, `teacher_forced_windows`, `batch=`): windows of equal length run together as one
unpadded batch [B, W] through one fresh cache per batch; each window's NLL is summed from its own row's
logits, so a cache that treats batch rows independently gives every window the NLL it gets alone, up to fp32
rounding (a batched matmul rounds differently; in a quantizing cache that can move an input across a code
boundary). Logits are computed only for the scored positions (`logits_to_keep`): the decode prefill scores its
last position only, so no [B, P, V] logits are materialised. `decode_perplexity` and
`teacher_forced_perplexity` run one window at a time.

`cache_factory` is any callable returning a fresh transformers `Cache` (one per batch of windows), e.g.
`transformers.DynamicCache` or `lambda: QuantizedCache("quanto", model.config, nbits=4)`; `None` in
`forward_perplexity` means one cache-free forward per window (the reference the protocols equal with a
full-precision cache). Perplexity is exp of the mean negative log-likelihood (natural log) over all
scored tokens of all windows. torch and transformers are imported when this module is imported.

Windows with error bars (`window_starts`, `decode_windows`, `paired_change`): W windows spread evenly over
the text, each scored for every cache, and the change of a cache against the reference (the full cache)
pooled over all scored tokens and paired per window, exp(sum_w (NLL_w - NLL_ref,w) / sum_w S_w) - 1, with a
95% percentile interval from resampling windows with replacement (10000 draws, numpy seed 0). Windows are
the unit resampled because a window's tokens share one context and are not independent.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = [
    "Perplexity",
    "WindowNll",
    "PairedChange",
    "window_starts",
    "decode_windows",
    "teacher_forced_windows",
    "paired_change",
    "tokenize",
    "forward_perplexity",
    "teacher_forced_perplexity",
    "decode_perplexity",
]


@dataclass(frozen=True)
class Perplexity:
    """A perplexity measurement: exp(nll_sum / tokens) over `windows` windows."""

    protocol: str
    nll_sum: float  # nats, summed over scored tokens
    tokens: int  # scored tokens
    windows: int
    cache_measure: float | None = None  # mean over windows and scored forwards of measure_cache(cache)

    @property
    def nll(self) -> float:
        """Mean negative log-likelihood per scored token (nats)."""
        return self.nll_sum / self.tokens

    @property
    def ppl(self) -> float:
        return math.exp(self.nll)


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Token ids of `text` as one sequence [N] (int64), without special tokens added."""
    return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]


def _check_causal_lm(model) -> None:
    if not callable(model) or not hasattr(model, "config") or not hasattr(model, "get_output_embeddings"):
        raise ValueError(f"expected a transformers causal LM, got {type(model).__name__}")
    if model.get_output_embeddings() is None:
        raise ValueError(f"{type(model).__name__} has no language-model head; load it with AutoModelForCausalLM")


def _windows(ids: torch.Tensor, length: int, windows: int, start: int) -> torch.Tensor:
    """Consecutive windows [windows, length] of `ids` [N] from token `start`; error if the text is too short."""
    if ids.dim() != 1:
        raise ValueError(f"ids must be one token sequence [N], got shape {tuple(ids.shape)}")
    for name, value in (("length", length), ("windows", windows), ("start", start)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an integer, got {value!r}")
    if windows < 1 or length < 2:
        raise ValueError(f"need at least one window of at least 2 tokens, got {windows} x {length}")
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}")  # a negative start would slice from the end
    need = start + length * windows
    if ids.numel() < need:
        raise ValueError(
            f"text too short: {ids.numel()} tokens, the protocol needs {need} "
            f"({windows} window(s) of {length} from token {start})"
        )
    return ids[start:need].view(windows, length)


class _Progress:
    """A one-line stderr progress display (tqdm when installed)."""

    def __init__(self, total: int, desc: str, enabled: bool):
        self.bar = None
        if not enabled:
            return
        try:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True)
        except ImportError:  # tqdm is a transformers dependency; keep a plain fallback anyway
            self.total, self.done, self.desc = total, 0, desc

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)
        elif hasattr(self, "done"):
            self.done += n
            print(f"\r{self.desc}: {self.done}/{self.total}", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif hasattr(self, "done"):
            print(file=sys.stderr)


def _nll(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Summed next-token NLL (fp64 log-softmax). logits: [T, V]; targets: [T]."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    return -logp.gather(-1, targets[:, None]).sum().item()


def _nll_rows(logits: torch.Tensor, targets: torch.Tensor) -> list[float]:
    """Summed next-token NLL of each row (fp64 log-softmax). logits: [B, T, V]; targets: [B, T]."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    return (-logp.gather(-1, targets[..., None]).sum((1, 2))).tolist()


@torch.no_grad()
def _batch_nll(model, xs: torch.Tensor, cache_factory, prefix: int, chunk: int, score_from: int, bar, measure):
    """([summed NLL of positions score_from..W-2 predicting their next token, per row of xs], the mean over the
    forwards that score a position of measure(cache, B), or None without `measure`).

    Feeds the B windows xs [B, W] as one unpadded batch through one fresh cache from `cache_factory`. Logits are
    computed only for the positions scored (`logits_to_keep`), so a long prefill never materialises [B, P, V].
    """
    b, w = xs.shape
    cache = cache_factory()
    nll, pos, measured = [0.0] * b, 0, []
    while pos < w - 1:  # the last token is only a target
        end = prefix if pos == 0 else min(pos + chunk, w - 1)
        lo = max(score_from, pos)
        keep = end - lo if lo < end else 1  # logits_to_keep=0 would mean every position
        logits = model(xs[:, pos:end], past_key_values=cache, use_cache=True, logits_to_keep=keep).logits
        if lo < end:  # logits: [B, end - lo, V], the predictions of positions lo..end-1
            for i, x in enumerate(_nll_rows(logits, xs[:, lo + 1 : end + 1])):
                nll[i] += x
            if measure is not None:
                measured.append(measure(cache, b))
        del logits
        bar.update(b * (end - pos))
        pos = end
    if hasattr(cache, "remove_hooks"):
        cache.remove_hooks()  # the batch is done: free the q_proj hooks of scoring formats
    return nll, (sum(measured) / len(measured) if measure is not None else None)


def _batches(n: int, batch: int | None) -> list[range]:
    """Row ranges of at most `batch` rows (None: all n in one) covering 0..n-1 in order."""
    if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
        raise ValueError(f"batch must be a positive integer or None, got {batch!r}")
    step = n if batch is None else batch
    return [range(i, min(i + step, n)) for i in range(0, n, step)]


def _run_windows(model, xs, cache_factory, prefix, chunk, score_from, bar, measure, batch):
    """(summed NLL per window of xs [N, W], measure per window or None): batches of `batch` windows, a fresh cache
    each; a window's measure is its batch's mean per row (the windows of one batch share it)."""
    nll, held = [], []
    for rows in _batches(xs.shape[0], batch):
        n, m = _batch_nll(model, xs[rows.start : rows.stop], cache_factory, prefix, chunk, score_from, bar, measure)
        nll += n
        held += [m] * len(rows)
    bar.close()
    return nll, held


def _run(model, xs, cache_factory, prefix, chunk, score_from, bar, measure) -> tuple[float, float | None]:
    """Summed NLL over windows xs [N, W], one at a time, and the mean of measure(cache) over windows (None without
    one)."""
    one = None if measure is None else (lambda cache, batch: measure(cache))
    nll, held = _run_windows(model, xs, cache_factory, prefix, chunk, score_from, bar, one, 1)
    return sum(nll), (sum(held) / len(held) if measure is not None else None)


def forward_perplexity(
    model, ids: torch.Tensor, *, window: int = 512, windows: int = 4, start: int = 0, progress: bool = False
) -> Perplexity:
    """Reference: one cache-free forward per window, W-1 scored predictions per window."""
    _check_causal_lm(model)
    xs = _windows(ids, window, windows, start)
    bar = _Progress(windows, "forward", progress)
    nll = 0.0
    with torch.no_grad():
        for x in xs:
            logits = model(x[None], use_cache=False).logits[0]  # [W, V]
            nll += _nll(logits[:-1], x[1:])
            bar.update(1)
    bar.close()
    return Perplexity("forward", nll, windows * (window - 1), windows)


def teacher_forced_perplexity(
    model,
    ids: torch.Tensor,
    cache_factory: Callable[[], object],
    *,
    window: int = 512,
    windows: int = 4,
    prefix: int = 1,
    chunk: int = 1,
    start: int = 0,
    progress: bool = True,
    measure_cache: Callable[[object], float] | None = None,
) -> Perplexity:
    """Teacher-forced windows through the cache (module docstring), one window at a time: W-1 scored predictions
    per window (`teacher_forced_windows` batches them).

    measure_cache: called on the cache after each forward that scores a position (e.g.
    `hf_peers.held_bits_per_element`); `cache_measure` is its mean over forwards and windows.
    """
    _check_causal_lm(model)
    if not 1 <= prefix < window or chunk < 1:
        raise ValueError(f"need 1 <= prefix < window and chunk >= 1, got prefix={prefix}, chunk={chunk}")
    xs = _windows(ids, window, windows, start)
    bar = _Progress(windows * (window - 1), "teacher-forced", progress)
    nll, measured = _run(model, xs, cache_factory, prefix, chunk, 0, bar, measure_cache)
    return Perplexity("teacher-forced", nll, windows * (window - 1), windows, measured)


def decode_perplexity(
    model,
    ids: torch.Tensor,
    cache_factory: Callable[[], object],
    *,
    prefill: int = 384,
    scored: int = 128,
    windows: int = 1,
    start: int = 0,
    progress: bool = True,
    measure_cache: Callable[[object], float] | None = None,
) -> Perplexity:
    """Prefill P tokens through the cache, then score S next tokens one decode step at a time (module docstring),
    one window at a time (`decode_windows` batches them).

    measure_cache: as in `teacher_forced_perplexity`.
    """
    _check_causal_lm(model)
    if prefill < 1 or scored < 1:
        raise ValueError(f"need prefill >= 1 and scored >= 1, got {prefill}, {scored}")
    xs = _windows(ids, prefill + scored, windows, start)
    bar = _Progress(windows * (prefill + scored - 1), "decode", progress)
    nll, measured = _run(model, xs, cache_factory, prefill, 1, prefill - 1, bar, measure_cache)
    return Perplexity("decode", nll, windows * scored, windows, measured)


# -- windows spread over the text, paired changes with window-bootstrap intervals ----------------------
@dataclass(frozen=True)
class WindowNll:
    """One window's scored NLL and what the cache held while scoring it."""

    start: int  # first token of the window in the text
    nll_sum: float  # nats, summed over the window's scored tokens
    tokens: int  # scored tokens
    held_bits: float | None  # mean over the scored steps of measure_cache(cache, batch): its batch's mean


@dataclass(frozen=True)
class PairedChange:
    """Pooled change of perplexity against a reference on the same windows, with a 95% bootstrap interval."""

    change: float  # exp(sum(nll - nll_ref) / tokens) - 1
    low: float
    high: float
    windows: int


def window_starts(n_tokens: int, length: int, windows: int, start: int = 0) -> list[int]:
    """`windows` disjoint windows of `length` tokens spread evenly from token `start` to the text's end.

    >>> window_starts(1000, 100, 3, start=0)
    [0, 450, 900]
    """
    for name, value in (("length", length), ("windows", windows), ("start", start)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an integer, got {value!r}")
    if windows < 1 or length < 2 or start < 0:
        raise ValueError(f"need windows >= 1, length >= 2 and start >= 0, got {windows}, {length}, {start}")
    room = n_tokens - start - length * windows
    if room < 0:
        raise ValueError(
            f"text too short: {n_tokens} tokens, the protocol needs {start + length * windows} "
            f"({windows} window(s) of {length} from token {start})"
        )
    if windows == 1:
        return [start]
    gap = room / (windows - 1)  # spare tokens between consecutive windows
    return [start + i * length + round(i * gap) for i in range(windows)]


def _check_starts(ids: torch.Tensor, starts: list[int], length: int) -> torch.Tensor:
    """The windows ids[s : s + length] for s in `starts`, stacked [len(starts), length]."""
    if ids.dim() != 1 or not starts or min(starts) < 0 or max(starts) + length > ids.numel():
        raise ValueError(f"windows of {length} tokens at {starts} do not fit a text of {ids.numel()} tokens")
    return torch.stack([ids[s : s + length] for s in starts])


def decode_windows(
    model,
    ids: torch.Tensor,
    cache_factory: Callable[[], object],
    starts: list[int],
    *,
    prefill: int = 3968,
    scored: int = 128,
    progress: bool = True,
    measure_cache: Callable[[object, int], float] | None = None,
    batch: int | None = None,
) -> list[WindowNll]:
    """The decode protocol on the windows ids[s : s + prefill + scored] for s in `starts`, one result per window.

    batch: windows fed together as one unpadded batch [batch, prefill + scored] through one fresh cache (None:
    all windows in one batch; 1: one window at a time). A window's NLL is the same (up to fp32 rounding) at any
    batch only if the cache treats batch rows independently (`kvq_core.cli_eval.BATCH_DEPENDENT` lists the
    caches that do not and runs them at batch 1).
    measure_cache: measure_cache(cache, batch), called after every scored forward (the prefill, then each decode
    step) with the batch's cache and its number of rows, returns the mean per window of the batch, e.g. the bits
    per K/V element one window holds (`cli_eval.CacheMaker.held_bits`). `WindowNll.held_bits` is its mean over the
    scored steps, the same for every window of a batch.
    """
    _check_causal_lm(model)
    if prefill < 1 or scored < 1:
        raise ValueError(f"need prefill >= 1 and scored >= 1, got {prefill}, {scored}")
    length = prefill + scored
    xs = _check_starts(ids, starts, length)
    bar = _Progress(len(starts) * (length - 1), "decode", progress)
    nll, held = _run_windows(model, xs, cache_factory, prefill, 1, prefill - 1, bar, measure_cache, batch)
    return [WindowNll(s, n, scored, h) for s, n, h in zip(starts, nll, held)]


def teacher_forced_windows(
    model,
    ids: torch.Tensor,
    cache_factory: Callable[[], object],
    starts: list[int],
    *,
    window: int = 512,
    prefix: int = 1,
    chunk: int = 1,
    progress: bool = True,
    measure_cache: Callable[[object, int], float] | None = None,
    batch: int | None = None,
) -> list[WindowNll]:
    """The teacher-forced protocol on the windows ids[s : s + window] for s in `starts`, one result per window
    (window - 1 scored predictions each); batch and measure_cache as in `decode_windows` (measured after every
    forward, all of which score)."""
    _check_causal_lm(model)
    if not 1 <= prefix < window or chunk < 1:
        raise ValueError(f"need 1 <= prefix < window and chunk >= 1, got prefix={prefix}, chunk={chunk}")
    xs = _check_starts(ids, starts, window)
    bar = _Progress(len(starts) * (window - 1), "teacher-forced", progress)
    nll, held = _run_windows(model, xs, cache_factory, prefix, chunk, 0, bar, measure_cache, batch)
    return [WindowNll(s, n, window - 1, h) for s, n, h in zip(starts, nll, held)]


def paired_change(
    nll: list[float], ref_nll: list[float], tokens: list[int], *, draws: int = 10000, seed: int = 0
) -> PairedChange:
    """Pooled change of perplexity against the reference over paired windows, with a window-bootstrap 95% interval.

    nll, ref_nll: summed NLL (nats) per window of the cache and of the reference on the same windows; tokens:
    scored tokens per window. change = exp(sum(nll - ref_nll) / sum(tokens)) - 1; the interval is the 2.5 and
    97.5 percentiles of the same statistic over `draws` resamples of the windows with replacement (numpy
    default_rng(seed)). One window gives an interval of zero width.
    """
    import numpy as np

    d = np.asarray(nll, dtype=np.float64) - np.asarray(ref_nll, dtype=np.float64)
    n = np.asarray(tokens, dtype=np.float64)
    if d.ndim != 1 or d.shape != n.shape or not d.size or (n <= 0).any():
        raise ValueError(f"need equal non-empty lists of per-window NLLs and token counts, got {d.shape}, {n.shape}")
    idx = np.random.default_rng(seed).integers(0, d.size, size=(draws, d.size))  # [draws, windows]
    boot = np.expm1(d[idx].sum(1) / n[idx].sum(1))
    low, high = np.percentile(boot, [2.5, 97.5])
    return PairedChange(float(np.expm1(d.sum() / n.sum())), float(low), float(high), int(d.size))
