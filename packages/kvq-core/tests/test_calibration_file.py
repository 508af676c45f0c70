"""Calibration files: a calibrated state survives save and load exactly; unusable files are refused with one line
naming the file, and a pickle is never unpickled."""

from __future__ import annotations

import json
import pickle
import struct
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

from kvq_core.calibration import calibrate  # noqa: E402
from kvq_core.calibration_file import (  # noqa: E402
    CalibrationFileError,
    check_fits,
    load_calibration,
    model_id,
    read_calibration,
    save_calibration,
)
from kvq_core.formats import get_format  # noqa: E402


@pytest.fixture(scope="module")
def states(tiny):
    """Calibrated states of the tiny Llama for methods with tensor and number entries (kvquant, skvq, bfp)."""
    ids = torch.randint(0, 97, (1, 48), generator=torch.Generator().manual_seed(1))
    return {
        "kvquant:2": calibrate(tiny, ids, "kvquant", 2, fisher=False),
        "skvq:k2v1.5": calibrate(tiny, ids, "skvq", "k2v1.5", fisher=False),
        "bfp:4": calibrate(tiny, ids, "bfp", 4, fisher=False),
    }


def assert_same_state(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for layer in want:
        assert list(got[layer]) == list(want[layer])
        for stream in want[layer]:
            assert list(got[layer][stream]) == list(want[layer][stream])
            for name, value in want[layer][stream].items():
                mine = got[layer][stream][name]
                assert type(mine) is type(value), (layer, stream, name)
                if isinstance(value, torch.Tensor):
                    assert mine.dtype == value.dtype and mine.shape == value.shape and torch.equal(mine, value)
                else:
                    assert mine == value


@pytest.mark.parametrize("method", ["kvquant:2", "skvq:k2v1.5", "bfp:4"])
def test_calibrated_state_round_trips_exactly(states, tiny, tmp_path, method):
    state = states[method]
    assert any(isinstance(v, torch.Tensor) for s in state[0].values() for v in s.values())
    path = tmp_path / "calib.safetensors"
    save_calibration(state, path, model=tiny, method=method)
    assert_same_state(load_calibration(path, tiny), state)
    f = read_calibration(path)
    assert f.info == {"method": method, "model": model_id(tiny)}
    name, bits = method.split(":")
    check_fits(f.state(), get_format(name, bits), 2, 2, 16)


def test_numbers_keep_their_type(tmp_path):
    state = {0: {"k": {"clip_ratio": 0.1 + 0.2, "n": 3, "t": torch.tensor(1.5, dtype=torch.float64)}}, 1: {}}
    save_calibration(state, tmp_path / "c.st")
    assert_same_state(load_calibration(tmp_path / "c.st"), state)


class Payload:
    """Unpickling this writes a marker file: proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("writer", ["torch.save", "pickle-protocol-2", "pickle-protocol-0"])
def test_pickle_with_a_payload_is_refused_without_running_it(tmp_path, writer):
    marker, path = tmp_path / "ran", tmp_path / "calib.pt"
    blob = {"meta": {}, "layers": {0: {"k": {"x": Payload(marker)}}}}
    if writer == "torch.save":
        torch.save(blob, path)
    else:
        path.write_bytes(pickle.dumps(blob, protocol=int(writer[-1])))
    with pytest.raises(CalibrationFileError, match=f"calibration file {path}: |calibration file {path} is a pickle"):
        load_calibration(path)
    assert not marker.exists()


def _safetensors_bytes(header: dict, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def _doc(layers: dict, **over) -> dict:
    return {
        "__metadata__": {
            "kvq_calibration": json.dumps(
                {"format": "kvq-calibration", "version": 1, "info": {}, "layers": layers, **over}
            )
        }
    }


TENSOR = {"dtype": "F16", "shape": [2], "data_offsets": [0, 4]}
BAD_FILES = {
    "missing": (None, "does not exist"),
    "empty": (b"", "is empty"),
    "seven-bytes": (b"garbage", "not a safetensors file"),
    "garbage": (bytes(range(256)) * 4, "not a safetensors file"),
    "text": (b"cache,method\nkvq,kivi\n", "not a safetensors file"),
    "header-not-json": (struct.pack("<Q", 4) + b"{{{{", "unreadable header"),
    "header-a-list": (_safetensors_bytes([]), "header is not an object"),
    "no-kvq-metadata": (_safetensors_bytes({"x": TENSOR}, b"\0" * 4), "without kvq calibration metadata"),
    "truncated": (_safetensors_bytes({**_doc({"0": {"k": {"x": None}}}), "0.k.x": TENSOR}, b"\0" * 2), "truncated"),
    "metadata-not-json": (_safetensors_bytes({"__metadata__": {"kvq_calibration": "{"}}), "not JSON"),
    "other-format": (_safetensors_bytes(_doc({}, format="gguf")), "not a 'kvq-calibration' document"),
    "newer-version": (_safetensors_bytes(_doc({}, version=2)), "format version 2"),
    "layer-key": (_safetensors_bytes(_doc({"first": {}})), "layer key 'first'"),
    "stream-key": (_safetensors_bytes(_doc({"0": {"q": {}}})), "streams among"),
    "nan-number": (_safetensors_bytes(_doc({"0": {"k": {"clip": "NaN"}}})), "finite number"),
    "missing-tensor": (_safetensors_bytes(_doc({"0": {"k": {"x": None}}})), "no tensor '0.k.x'"),
    "extra-tensor": (_safetensors_bytes({**_doc({}), "0.k.x": TENSOR}, b"\0" * 4), "tensor '0.k.x' is not in"),
}


@pytest.mark.parametrize("content,message", BAD_FILES.values(), ids=BAD_FILES.keys())
def test_unusable_files_are_refused_by_name(tmp_path, content, message):
    path = tmp_path / "calib.safetensors"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(CalibrationFileError) as e:
        load_calibration(path)
    assert str(path) in str(e.value) and message in str(e.value) and "\n" not in str(e.value)


def test_another_models_file_is_refused(tiny, tmp_path, make_tiny_llama):
    path = tmp_path / "c.safetensors"
    save_calibration({}, path, model=make_tiny_llama(layers=3))
    with pytest.raises(CalibrationFileError, match="was made for model llama:L3:H4/2:d64, not llama:L2:H4/2:d64"):
        load_calibration(path, tiny)


def test_a_state_for_another_method_or_shape_does_not_fit(states):
    kvquant, skvq = states["kvquant:2"], states["skvq:k2v1.5"]
    with pytest.raises(CalibrationFileError, match=r"0\.k holds codebook.*; skvq-k2v1.5 needs clip_ratio, reorder"):
        check_fits(kvquant, get_format("skvq", "k2v1.5"), 2, 2, 16)
    with pytest.raises(CalibrationFileError, match=r"0\.k\.codebook is float16 \[4\]; .* needs float16 \[8\]"):
        check_fits(kvquant, get_format("kvquant", 3), 2, 2, 16)
    with pytest.raises(CalibrationFileError, match="holds layers 0..1; .* needs layers 0..2"):
        check_fits(skvq, get_format("skvq", "k2v1.5"), 3, 2, 16)
    broken = {i: {s: dict(v) for s, v in layer.items()} for i, layer in kvquant.items()}
    broken[1]["v"]["codebook"] = torch.full_like(broken[1]["v"]["codebook"], float("nan"))
    with pytest.raises(CalibrationFileError, match=r"1\.v\.codebook holds NaN or Inf"):
        check_fits(broken, get_format("kvquant", 2), 2, 2, 16)


def test_save_refuses_what_it_must_not_overwrite(tmp_path, states):
    readme = tmp_path / "README.md"
    readme.write_text("# notes\n")
    with pytest.raises(ValueError, match="not a safetensors file.*not overwriting it"):
        save_calibration(states["kvquant:2"], readme)
    assert readme.read_text() == "# notes\n"
    with pytest.raises(ValueError, match="is a directory"):
        save_calibration({}, tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        save_calibration({}, tmp_path / "no" / "c.safetensors")
    with pytest.raises(ValueError, match="layer keys are integers"):
        save_calibration({"0": {}}, tmp_path / "c.safetensors")
    with pytest.raises(ValueError, match="a tensor or a finite number"):
        save_calibration({0: {"k": {"x": float("inf")}}}, tmp_path / "c.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md"]  # no file, no temporary left behind
    path = tmp_path / "c.safetensors"
    save_calibration(states["kvquant:2"], path)
    save_calibration(states["skvq:k2v1.5"], path)  # a calibration file is replaced
    assert_same_state(load_calibration(path), states["skvq:k2v1.5"])


def test_reading_a_header_does_not_import_torch(tmp_path, states):
    path = tmp_path / "c.safetensors"
    save_calibration(states["kvquant:2"], path)
    code = (
        "import sys; from kvq_core.calibration_file import read_calibration; "
        f"f = read_calibration({str(path)!r}); print(sorted(f.layout), 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["[0,", "1]", "False"]
