"""Calibration state on disk: codec tensors in a safetensors file, everything else as JSON, so loading runs no code.

The state is `calibration.calibrate`'s {layer: {"k": {name: value}, "v": {name: value}}}, values tensors or
Python numbers (e.g. SKVQ's `clip_ratio`). A file holds one tensor per leaf, named "<layer>.<stream>.<name>"
(e.g. "0.k.codebook"), and in the safetensors header's `__metadata__` one JSON entry, "kvq_calibration":

    {"format": "kvq-calibration", "version": 1, "info": {"model": "llama:L2:H4/2:d64", ...},
     "layers": {"0": {"k": {"codebook": null}, "v": {"reorder": null, "clip_ratio": 0.5}}}}

where null marks a tensor leaf and a number is the value itself. Reading checks the header in plain Python
(no torch import) before safetensors loads a byte: a pickle, a truncated file or a layout that does not match
the tensors is refused with one line that names the file.
"""

from __future__ import annotations

import json
import math
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "CalibrationFileError",
    "CalibrationFile",
    "save_calibration",
    "load_calibration",
    "read_calibration",
    "check_fits",
    "model_id",
]

FORMAT, VERSION = "kvq-calibration", 1
META_KEY = "kvq_calibration"
STREAMS = ("k", "v")
# torch.save writes a zip archive (PK\x03\x04); older torch and plain pickle start with the PROTO opcode 0x80
_PICKLE_MAGICS = (b"PK\x03\x04", b"\x80")
_MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit on the JSON header


class CalibrationFileError(ValueError):
    """A calibration file that cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class CalibrationFile:
    """A checked calibration file: its path, the saver's `info` (with "model" when saved with one) and layout.

    layout: {layer: {stream: {name: None (a tensor leaf) or the number stored}}}; tensors load with `state()`.
    """

    path: Path
    info: dict
    layout: dict

    def state(self, device=None) -> dict:
        """The calibration state {layer: {stream: {name: tensor or number}}}, tensors on `device` (default CPU)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(self.path), device="cpu")
        except (SafetensorError, OSError) as e:
            raise CalibrationFileError(f"calibration file {self.path}: unreadable ({_first_line(e)})") from None
        out = {}
        for layer, streams in self.layout.items():
            out[layer] = {}
            for stream, leaves in streams.items():
                out[layer][stream] = {
                    name: (value if value is not None else _on(tensors[f"{layer}.{stream}.{name}"], device))
                    for name, value in leaves.items()
                }
        return out

    def check_model(self, model) -> None:
        """Refuse a file saved for another model (its `model_id`) or holding more layers than the model has."""
        want = model_id(model)
        if "model" in self.info and self.info["model"] != want:
            raise CalibrationFileError(
                f"calibration file {self.path} was made for model {self.info['model']}, not {want}"
            )
        layers = model.config.get_text_config(decoder=True).num_hidden_layers
        beyond = [i for i in self.layout if i >= layers]
        if beyond:
            raise CalibrationFileError(
                f"calibration file {self.path} holds layer {beyond[0]}, but the model has {layers} layers"
            )


def model_id(model) -> str:
    """The model a calibration belongs to: type, layers, query/KV heads and hidden size, e.g. 'llama:L2:H4/2:d64'."""
    c = model.config.get_text_config(decoder=True)
    return (
        f"{c.model_type}:L{c.num_hidden_layers}:H{c.num_attention_heads}/"
        f"{getattr(c, 'num_key_value_heads', c.num_attention_heads)}:d{c.hidden_size}"
    )


def save_calibration(state: dict, path: str | Path, model=None, **info) -> None:
    """Write per-layer codec state ({layer: {"k": state, "v": state}}) and the model it came from to `path`.

    `info` (JSON-serialisable, e.g. method="kvquant:3") is stored beside the model's id. The file is written to
    a temporary name and renamed, so a failed save leaves any earlier file whole; an existing file at `path`
    that is not a kvq calibration file is refused, not overwritten.
    """
    import torch
    from safetensors.torch import save_file

    path = Path(path)
    if path.is_dir():
        raise ValueError(f"calibration file {path} is a directory")
    if not path.parent.is_dir():
        raise ValueError(f"calibration file {path}: directory {path.parent} does not exist")
    if path.exists():
        try:
            read_calibration(path)
        except CalibrationFileError as e:
            raise ValueError(f"{e}; not overwriting it") from None
    meta = dict(info)
    if model is not None:
        meta["model"] = model_id(model)
    layout, tensors = {}, {}
    if not isinstance(state, dict):
        raise ValueError(
            f"calibration state must be a dict {{layer: {{'k': ..., 'v': ...}}}}, got {type(state).__name__}"
        )
    for layer, streams in state.items():
        if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
            raise ValueError(f"calibration state: layer keys are integers >= 0, got {layer!r}")
        if not isinstance(streams, dict) or not set(streams) <= set(STREAMS):
            raise ValueError(f"calibration state layer {layer}: expected a dict with keys among {STREAMS}")
        layout[str(layer)] = {}
        for stream, leaves in streams.items():
            if not isinstance(leaves, dict):
                raise ValueError(f"calibration state {layer}.{stream}: expected a dict of tensors and numbers")
            layout[str(layer)][stream] = {}
            for name, value in leaves.items():
                key = f"{layer}.{stream}.{name}"
                if not isinstance(name, str) or not name or "." in name:
                    raise ValueError(f"calibration state {layer}.{stream}: bad entry name {name!r}")
                if isinstance(value, torch.Tensor):
                    tensors[key] = value.detach().to("cpu").contiguous().clone()  # safetensors refuses shared storage
                    layout[str(layer)][stream][name] = None
                elif _is_number(value):
                    layout[str(layer)][stream][name] = value
                else:
                    raise ValueError(f"calibration state {key}: expected a tensor or a finite number, got {value!r}")
    header = {"format": FORMAT, "version": VERSION, "info": meta, "layers": layout}
    try:
        text = json.dumps(header, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"calibration info must be JSON numbers, strings, lists and dicts: {e}") from None
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={META_KEY: text})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_calibration(calibration: dict | str | Path, model=None) -> dict:
    """Per-layer codec state from a dict (returned as is) or a file written by `save_calibration`.

    With `model`, the file must have been saved for the same model (`model_id`) and its tensors load onto the
    model's device. CalibrationFileError (a ValueError) for a missing, empty, truncated, pickled, foreign or
    malformed file, or one made for another model.
    """
    if not isinstance(calibration, (str, Path)):
        return calibration
    f = read_calibration(calibration)
    device = None
    if model is not None:
        f.check_model(model)
        param = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
        device = param.device if param is not None else None
    return f.state(device)


def read_calibration(path: str | Path) -> CalibrationFile:
    """Check a calibration file's header and layout without importing torch; CalibrationFileError if unusable."""
    path = Path(path)
    if not path.exists():
        raise CalibrationFileError(f"calibration file {path} does not exist")
    if path.is_dir():
        raise CalibrationFileError(f"calibration file {path} is a directory")
    try:
        with path.open("rb") as f:
            head = f.read(8)
            size = os.fstat(f.fileno()).st_size
            if len(head) == 0:
                raise CalibrationFileError(f"calibration file {path} is empty")
            if head.startswith(_PICKLE_MAGICS):
                raise CalibrationFileError(
                    f"calibration file {path} is a pickle (torch.save) file, which could run code when loaded; "
                    "kvq reads only the safetensors files save_calibration writes: calibrate again"
                )
            if len(head) < 8:
                raise CalibrationFileError(f"calibration file {path}: not a safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, _MAX_HEADER_BYTES):
                raise CalibrationFileError(
                    f"calibration file {path}: not a safetensors file, or truncated "
                    f"(header of {n} bytes in a file of {size})"
                )
            raw = f.read(n)
    except OSError as e:
        raise CalibrationFileError(f"calibration file {path}: {e.strerror or e}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise CalibrationFileError(f"calibration file {path}: not a safetensors file (unreadable header)") from None
    if not isinstance(header, dict):
        raise CalibrationFileError(f"calibration file {path}: not a safetensors file (header is not an object)")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or META_KEY not in meta:
        raise CalibrationFileError(
            f"calibration file {path}: a safetensors file without kvq calibration metadata (not from save_calibration)"
        )
    end = 8 + n + max((_data_end(entry) for entry in header.values()), default=0)
    if end != size:
        raise CalibrationFileError(
            f"calibration file {path}: truncated or padded ({size} bytes, its header describes {end})"
        )
    try:
        doc = json.loads(meta[META_KEY])
    except (TypeError, ValueError):
        raise CalibrationFileError(f"calibration file {path}: its {META_KEY} metadata is not JSON") from None
    info, layout = _check_doc(doc, path)
    _check_tensors(layout, header, path)
    return CalibrationFile(path, info, layout)


def _check_doc(doc, path: Path) -> tuple[dict, dict]:
    """(info, layout with integer layer keys) from the metadata JSON; CalibrationFileError naming what is wrong."""

    def bad(what: str) -> CalibrationFileError:
        return CalibrationFileError(f"calibration file {path}: {what}")

    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise bad(f"metadata is not a {FORMAT!r} document")
    if doc.get("version") != VERSION:
        raise bad(f"format version {doc.get('version')!r}; this kvq reads version {VERSION}")
    info, layers = doc.get("info"), doc.get("layers")
    if not isinstance(info, dict) or not isinstance(layers, dict):
        raise bad("metadata needs an 'info' object and a 'layers' object")
    if "model" in info and not isinstance(info["model"], str):
        raise bad(f"info.model must be a string, got {info['model']!r}")
    layout = {}
    for layer, streams in layers.items():
        if not (layer.isascii() and layer.isdigit() and layer == str(int(layer))):
            raise bad(f"layer key {layer!r} is not a non-negative integer")
        if not isinstance(streams, dict) or not set(streams) <= set(STREAMS):
            raise bad(f"layer {layer} must map streams among {STREAMS} to entries, got {streams!r:.80}")
        for stream, leaves in streams.items():
            if not isinstance(leaves, dict):
                raise bad(f"layer {layer} stream {stream} must be an object of entries")
            for name, value in leaves.items():
                if "." in name or not name:
                    raise bad(f"layer {layer} stream {stream}: bad entry name {name!r}")
                if value is not None and not _is_number(value):
                    raise bad(f"{layer}.{stream}.{name} must be null (a tensor) or a finite number, got {value!r:.80}")
        layout[int(layer)] = streams
    return info, dict(sorted(layout.items()))


def _check_tensors(layout: dict, header: dict, path: Path) -> None:
    """The tensors the layout names (null leaves) are exactly the tensors the file holds."""
    named = {
        f"{layer}.{stream}.{name}"
        for layer, streams in layout.items()
        for stream, leaves in streams.items()
        for name, value in leaves.items()
        if value is None
    }
    held = set(header)
    if named - held:
        raise CalibrationFileError(
            f"calibration file {path}: no tensor {sorted(named - held)[0]!r}, which its layout names"
        )
    if held - named:
        raise CalibrationFileError(f"calibration file {path}: tensor {sorted(held - named)[0]!r} is not in its layout")


def _data_end(entry) -> int:
    """Where a safetensors header entry's bytes end (0 for one without valid offsets: safetensors rejects it)."""
    offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
    if isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets):
        return offsets[1]
    return 0


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and (not isinstance(value, float) or math.isfinite(value))


def _on(tensor, device):
    return tensor if device is None else tensor.to(device)


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0]


def check_fits(state: dict, fmt, layers: int, kv_heads: int, head_dim: int, where: str = "calibration") -> None:
    """Refuse state that `fmt`'s codecs on this model would not hold: every layer, the same streams and entries,
    tensors of the same dtype and shape (those of a calibration on random data), finite values.

    A state for another method or head layout otherwise fails deep inside a codec or, worse, quantizes with it.
    """
    import torch

    from .cache import StreamingLayer

    with torch.random.fork_rng(devices=[]):  # the reference calibration must not move the caller's RNG
        torch.manual_seed(0)
        ref_layer = StreamingLayer(fmt, head_dim)
        x = torch.randn(2, 1, kv_heads, 64, head_dim)  # [K/V, B, H_kv, T, D]
        ref_layer.calibrate(x[0], x[1], None, None)
    ref = {s: getattr(ref_layer, s).codec.state_dict() for s in STREAMS if getattr(ref_layer, s).codec is not None}
    if sorted(state) != list(range(layers)):
        raise CalibrationFileError(
            f"{where} holds layers {_ranges(sorted(state))}; {fmt.name} on this model needs layers {_ranges(range(layers))}"
        )
    for layer, streams in state.items():
        if sorted(streams) != sorted(ref):
            raise CalibrationFileError(
                f"{where}: layer {layer} holds streams {sorted(streams)}, {fmt.name} calibrates {sorted(ref)}"
            )
        for stream, leaves in streams.items():
            want = ref[stream]
            if sorted(leaves) != sorted(want):
                raise CalibrationFileError(
                    f"{where}: {layer}.{stream} holds {', '.join(sorted(leaves)) or 'nothing'}; "
                    f"{fmt.name} needs {', '.join(sorted(want))} (calibrated for another method?)"
                )
            for name, value in leaves.items():
                key = f"{layer}.{stream}.{name}"
                expect = want[name]
                if isinstance(expect, torch.Tensor) != isinstance(value, torch.Tensor):
                    raise CalibrationFileError(
                        f"{where}: {key} must be a {'tensor' if isinstance(expect, torch.Tensor) else 'number'}"
                    )
                if not isinstance(value, torch.Tensor):
                    continue
                if value.dtype != expect.dtype or value.shape != expect.shape:
                    raise CalibrationFileError(
                        f"{where}: {key} is {_describe(value)}; {fmt.name} with {kv_heads} KV heads of "
                        f"{head_dim} needs {_describe(expect)}"
                    )
                if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                    raise CalibrationFileError(f"{where}: {key} holds NaN or Inf")


def _describe(t) -> str:
    return f"{str(t.dtype).removeprefix('torch.')} {list(t.shape)}"


def _ranges(values) -> str:
    values = list(values)
    if not values:
        return "none"
    if values == list(range(values[0], values[-1] + 1)):
        return f"{values[0]}..{values[-1]}" if len(values) > 1 else str(values[0])
    return ", ".join(map(str, values))
