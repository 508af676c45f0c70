"""Bad-input corpus for `kvq-eval`: cache names and bit widths, window options, --csv destinations, --calibration files.

Each case runs kvq-eval in a subprocess and must fail cleanly (tests/corpus/conftest.py): exit 2, one stderr line
naming the problem, no traceback, and no file in the case's folder changed, created or removed. Ids that name a
reported bad input carry its words (`csv-README.md-rewritten-to-174-bytes`, `calibration-torch-pickle-runs-code`,
...). Most cases fail before torch is imported (a tenth of a second each); the few that need the model use a tiny
random Llama saved to a folder. A positive control at the end appends to a kvq-eval CSV and keeps its rows.
"""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import pytest

from kvq_core.cli_eval import CSV_COLUMNS, GENERATE_COLUMNS
from kvq_sim import report_data

ROOT = Path(__file__).resolve().parents[2]
EVAL = "kvq_core.cli_eval"
QUIET = {"OMP_NUM_THREADS": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error"}
WORDS = [f"w{i}" for i in range(90)]
TEXT = " ".join(WORDS[(7 * i * i + i) % len(WORDS)] for i in range(300)).encode()  # 300 tokens
TINY_ID = "llama:L2:H4/2:d64"  # calibration_file.model_id of the tiny model below
# the headers kvq-eval writes, as it writes them ("\r\n" line ends: the csv module's)
CSV_HEADER = (",".join(CSV_COLUMNS) + "\r\n").encode()
GENERATE_HEADER = (",".join(GENERATE_COLUMNS) + "\r\n").encode()


class Payload:
    """Unpickling this creates the file `ran`: proof that a data file ran code."""

    def __reduce__(self):
        return (open, ("ran", "w"))


def torch_save_zip(obj) -> bytes:
    """The bytes torch.save writes (a zip holding data.pkl), built without torch."""
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps(obj, protocol=2))
        z.writestr("archive/version", "3\n")
    return buf.getvalue()


def calibration_bytes(layers: dict, tensors: dict, info: dict | None = None, cut: int = 0, version: int = 1) -> bytes:
    """A safetensors file as calibration_file writes it: layout JSON in __metadata__, zeroed tensors."""
    doc = {"format": "kvq-calibration", "version": version, "info": info or {}, "layers": layers}
    header, offset = {"__metadata__": {"kvq_calibration": json.dumps(doc)}}, 0
    for name, (dtype, shape, nbytes) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header).encode()
    data = struct.pack("<Q", len(raw)) + raw + bytes(offset)
    return data[: len(data) - cut]


# a kvquant:2 calibration of the tiny model: 2 layers, 2 KV heads of 16 channels
KVQUANT = {
    str(i): {"k": {"codebook": None, "static_scale": None, "static_zero": None}, "v": {"codebook": None}}
    for i in range(2)
}
KVQUANT_TENSORS = {
    f"{i}.{name}": (("F16", [4], 8) if name.endswith("codebook") else ("F16", [2, 16], 64))
    for i in range(2)
    for name in ("k.codebook", "k.static_scale", "k.static_zero", "v.codebook")
}
E2E_CSV = (ROOT / "reports/measurements" / report_data.E2E_CSV).read_bytes()
#: a table of kvq-eval before its interval and provenance columns (the header and first row of an older
#: reports/quality/hf_peers_decode.csv)
OLD_EVAL_CSV = (
    b"cache,protocol,ppl,nll,held_bits_per_element,scored_tokens,windows,start,params,text,model,seconds,torch,"
    b"transformers,cpu,date\r\n"
    b"full,decode,11.7445,2.463383,32.000,128,1,512,prefill=384 scored=128,pydoc_text('evaluation'),"
    b"SmolLM2-135M-Instruct.Q4_1.gguf,99.2,2.13.0+cpu,5.23.0,x86_64,2026-11-23T05:15:51+00:00\r\n"
)

# (id, args, files in the case folder {name: bytes}, message regex after "kvq-eval: error: ")
CASES = [
    # cache names and bit widths
    ("method-unknown", ["kivi2:2"], {}, r"unknown cache 'kivi2:2'; valid methods: full, "),
    ("method-wrong-case", ["KIVI:2"], {}, r"unknown cache 'KIVI:2'"),
    ("bits-5", ["kivi:5"], {}, r"method 'kivi' has no 5-bit variant; valid bits: 2, 3, 4, 8"),
    ("bits-0", ["kivi:0"], {}, r"method 'kivi' has no 0-bit variant"),
    ("bits-negative", ["kvquant:-3"], {}, r"method 'kvquant' has no -3-bit variant"),
    ("bits-text", ["kivi:two"], {}, r"cannot read bits 'two'"),
    ("bits-empty-after-colon", ["kivi:"], {}, r"cache 'kivi:' names no bit width after ':'"),
    ("peer-bits-3", ["quanto:3"], {}, r"transformers' quanto cache has no variant 'quanto:3'; valid: quanto:2, quanto:4"),
    ("cache-named-twice", ["kivi:2", "kivi:02"], {}, r"caches kivi:2 and kivi:02 are the same cache \(kvq:kivi-2\)"),
    ("no-cache", [], {}, r"name at least one cache"),
    ("generate-bits-7", ["generate", "kivi:7"], {}, r"method 'kivi' has no 7-bit variant"),
    # window options: ranges checked by argparse, before anything loads
    ("prefill-zero", ["kivi:2", "--prefill", "0"], {}, r"argument --prefill: must be at least 1, got 0"),
    ("scored-negative", ["kivi:2", "--scored", "-5"], {}, r"argument --scored: must be at least 1, got -5"),
    ("start-negative", ["kivi:2", "--start=-1"], {}, r"argument --start: must be at least 0, got -1"),
    ("start-not-an-integer", ["kivi:2", "--start", "1e3"], {}, r"argument --start: '1e3' is not an integer"),
    ("windows-zero", ["kivi:2", "--windows", "0"], {}, r"argument --windows: must be at least 1, got 0"),
    ("window-one-token", ["kivi:2", "--protocol", "teacher-forced", "--window", "1"], {}, r"argument --window: must be at least 2, got 1"),
    ("chunk-zero", ["kivi:2", "--chunk", "0"], {}, r"argument --chunk: must be at least 1, got 0"),
    ("prefix-not-below-window", ["kivi:2", "--protocol", "both", "--prefix", "64", "--window", "64"], {}, r"need --prefix < --window, got 64 and 64"),
    ("protocol-unknown", ["kivi:2", "--protocol", "greedy"], {}, r"argument --protocol: invalid choice: 'greedy'"),
    ("option-unknown", ["kivi:2", "--bits", "2"], {}, r"unrecognized arguments: --bits 2"),
    ("generate-new-tokens-2", ["generate", "kivi:2", "--new-tokens", "2"], {}, r"argument --new-tokens: must be at least 3, got 2"),
    ("generate-prompt-tokens-0", ["generate", "--prompt-tokens", "0"], {}, r"argument --prompt-tokens: must be at least 1, got 0"),
    ("model-not-a-directory", ["kivi:2", "--model", "nowhere"], {}, r"--model nowhere: not a directory"),
    ("model-without-config", ["kivi:2", "--model", "empty"], {"empty/weights.bin": b"\0"}, r"--model empty: no config\.json"),
    ("text-missing", ["kivi:2", "--text", "missing.txt"], {}, r"--text missing\.txt: .*No such file"),
    ("text-not-utf8", ["kivi:2", "--text", "t.txt"], {"t.txt": b"caf\xe9 " * 50}, r"--text t\.txt: 'utf-8' codec can't decode"),
    # --csv destinations: refused before the model loads, the file left as it was
    ("csv-README.md-rewritten-to-174-bytes", ["kivi:2", "--csv", "README.md"], {"README.md": (ROOT / "README.md").read_bytes()}, r"--csv README\.md: not a kvq-eval CSV with this command's columns \(header '# "),
    ("csv-another-tools-csv-header-reordered", ["kivi:2", "--csv", "e2e.csv"], {"e2e.csv": E2E_CSV}, r"--csv e2e\.csv: not a kvq-eval CSV .*header 'backend,bits,batch"),
    ("csv-older-kvq-eval-schema", ["full", "--csv", "peers.csv"], {"peers.csv": OLD_EVAL_CSV}, r"--csv peers\.csv: not a kvq-eval CSV .*header 'cache,protocol,ppl"),
    ("csv-generate-csv-for-perplexity", ["kivi:2", "--csv", "g.csv"], {"g.csv": GENERATE_HEADER}, r"--csv g\.csv: not a kvq-eval CSV .*header 'cache,method,bits,avg_bits"),
    ("csv-perplexity-csv-for-generate", ["generate", "kivi:2", "--csv", "q.csv"], {"q.csv": CSV_HEADER}, r"--csv q\.csv: not a kvq-eval CSV .*header 'cache,method,bits,protocol"),
    ("csv-row-with-missing-fields", ["kivi:2", "--csv", "q.csv"], {"q.csv": CSV_HEADER + b"kvq:kivi-2,kivi,2\r\n"}, rf"--csv q\.csv: row 2 has 3 fields, the header {len(CSV_COLUMNS)}"),
    ("csv-not-utf8", ["kivi:2", "--csv", "q.csv"], {"q.csv": b"cache,m\xe9thod\r\n"}, r"--csv q\.csv: not a kvq-eval CSV \(not UTF-8 text\)"),
    ("csv-unclosed-quote", ["kivi:2", "--csv", "q.csv"], {"q.csv": CSV_HEADER + b'"kvq\r\n' * 3}, r"--csv q\.csv: row 2 has 1 fields|not a kvq-eval CSV"),
    ("csv-a-directory", ["kivi:2", "--csv", "out"], {"out/keep.txt": b"x"}, r"--csv out: is a directory"),
    ("csv-under-a-file", ["kivi:2", "--csv", "notes.txt/q.csv"], {"notes.txt": b"notes\n"}, r"--csv notes\.txt/q\.csv: notes\.txt is not a directory"),
    ("csv-unwritable-folder", ["kivi:2", "--csv", "/proc/kvq-eval.csv"], {}, r"--csv /proc/kvq-eval\.csv: cannot write in /proc"),
    # --calibration files: checked before the model loads, never unpickled
    ("calibration-missing", ["kvquant:2", "--calibration", "c.safetensors"], {}, r"calibration file c\.safetensors does not exist"),
    ("calibration-empty", ["kvquant:2", "--calibration", "c.pt"], {"c.pt": b""}, r"calibration file c\.pt is empty"),
    ("calibration-garbage-bytes", ["kvquant:2", "--calibration", "c.pt"], {"c.pt": bytes(range(255, -1, -1)) * 8}, r"calibration file c\.pt: not a safetensors file, or truncated"),
    ("calibration-torch-pickle-runs-code", ["kvquant:2", "--calibration", "c.pt"], {"c.pt": torch_save_zip({"meta": {}, "layers": Payload()})}, r"calibration file c\.pt is a pickle \(torch\.save\) file, which could run code"),
    ("calibration-plain-pickle-runs-code", ["kvquant:2", "--calibration", "c.pkl"], {"c.pkl": pickle.dumps(Payload(), protocol=4)}, r"calibration file c\.pkl is a pickle"),
    ("calibration-pickle-protocol-0", ["kvquant:2", "--calibration", "c.pkl"], {"c.pkl": pickle.dumps(Payload(), protocol=0)}, r"calibration file c\.pkl: not a safetensors file"),
    ("calibration-a-directory", ["kvquant:2", "--calibration", "calib"], {"calib/x": b""}, r"calibration file calib is a directory"),
    ("calibration-truncated", ["kvquant:2", "--calibration", "c.st"], {"c.st": calibration_bytes(KVQUANT, KVQUANT_TENSORS, cut=10)}, r"calibration file c\.st: truncated or padded \(\d+ bytes, its header describes \d+\)"),
    ("calibration-another-tools-safetensors", ["kvquant:2", "--calibration", "kv.safetensors"], {"kv.safetensors": (ROOT / "tests/data/smollm2_kv_sample.safetensors").read_bytes()}, r"calibration file kv\.safetensors: a safetensors file without kvq calibration metadata"),
    ("calibration-layout-without-its-tensor", ["kvquant:2", "--calibration", "c.st"], {"c.st": calibration_bytes({"0": {"k": {"codebook": None}}}, {})}, r"calibration file c\.st: no tensor '0\.k\.codebook', which its layout names"),
    ("calibration-newer-format-version", ["kvquant:2", "--calibration", "c.st"], {"c.st": calibration_bytes({}, {}, version=9)}, r"calibration file c\.st: format version 9; this kvq reads version 1"),
]  # fmt: skip


@pytest.mark.parametrize("args,files,message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_eval_input(cli, tmp_path, args, files, message):
    _write(tmp_path, files)
    before = _state(tmp_path)
    r = cli.run(EVAL, args, cwd=tmp_path)
    cli.fails(r, "^kvq-eval: error: " + message, before=cli.snapshot(before), code=2)
    assert _state(tmp_path) == before, "files were created or removed"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A folder with a tiny random Llama (2 layers, 2 KV heads x 16, 256 positions) and a word-level tokenizer."""
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    from tokenizers import Tokenizer, models, pre_tokenizers

    path = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]", *WORDS])}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[UNK]")
    fast.save_pretrained(path)
    return path


CALIB_TEXT = " ".join(f"c{(5 * i * i + 3 * i) % 70}" for i in range(200)).encode()  # shares no 64-token run with TEXT
SMALL = ["--text", "t.txt", "--calibration-text", "c.txt", "--calibration-sequences", "2", "--calibration-length", "33",
         "--start", "0", "--windows", "1", "--prefill", "24", "--scored", "8", "--no-progress"]  # fmt: skip
# checks that need the model: (id, args after --model DIR, files, message regex)
MODEL_CASES = [
    ("calibration-of-another-model", ["kvquant:2", *SMALL, "--calibration", "c.st"], {"c.st": calibration_bytes({}, {}, {"model": "llama:L32:H32/8:d4096"})}, rf"calibration file c\.st was made for model llama:L32:H32/8:d4096, not {TINY_ID}"),
    ("calibration-of-another-method", ["skvq:2", *SMALL, "--calibration", "c.st"], {"c.st": calibration_bytes(KVQUANT, KVQUANT_TENSORS, {"model": TINY_ID})}, r"calibration file c\.st: 0\.k holds codebook, static_scale, static_zero; skvq-2 needs clip_ratio, reorder"),
    ("start-beyond-the-text", ["kivi:2", *SMALL, "--start", "290"], {}, r"text too short: 300 tokens, the decode protocol needs 322"),
    ("window-beyond-max_position_embeddings", ["kivi:2", *SMALL, "--prefill", "250", "--scored", "7"], {}, r"a decode window \(--prefill 250 \+ --scored 7\) is 257 tokens, beyond the model's 256 positions"),
]  # fmt: skip


@pytest.mark.parametrize("args,files,message", [c[1:] for c in MODEL_CASES], ids=[c[0] for c in MODEL_CASES])
def test_bad_eval_input_with_a_model(cli, tmp_path, tiny_model, args, files, message):
    _write(tmp_path, {"t.txt": TEXT, "c.txt": CALIB_TEXT, "q.csv": CSV_HEADER, **files})
    before = _state(tmp_path)
    r = cli.run(EVAL, ["--model", tiny_model, *args, "--csv", "q.csv"], cwd=tmp_path, env=QUIET)
    cli.fails(r, "^kvq-eval: error: " + message, before=cli.snapshot(before), code=2)
    assert _state(tmp_path) == before, "files were created or removed"


def test_positive_control_appends_to_a_kvq_eval_csv(cli, tmp_path, tiny_model):
    """The harness sees a working run: a row is appended and the earlier rows are kept byte for byte."""
    old = CSV_HEADER + b"kvq:kivi-2,kivi,2,decode" + b"," * (len(CSV_COLUMNS) - 4) + b"\r\n"
    _write(tmp_path, {"t.txt": TEXT, "c.txt": CALIB_TEXT, "q.csv": old})
    r = cli.run(EVAL, ["--model", tiny_model, "kivi:2", *SMALL, "--csv", "q.csv"], cwd=tmp_path, env=QUIET)
    assert r.returncode == 0, r.stderr[-2000:]
    new = (tmp_path / "q.csv").read_bytes()
    rows = new[len(old) :].split(b"\r\n")[:-1]  # the full cache runs first, as the reference of the paired change
    assert new.startswith(old) and [r.split(b",", 4)[:4] for r in rows] == [
        [b"full", b"full", b"", b"decode"],
        [b"kvq:kivi-2", b"kivi", b"2", b"decode"],
    ]
    assert [p.name for p in _state(tmp_path) if p.exists()] == ["c.txt", "q.csv", "t.txt"]  # no temporary file left


def _write(folder: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def _state(folder: Path) -> list[Path]:
    """Every file and folder under `folder`, plus `ran` (a pickle payload's proof of execution)."""
    return sorted({*folder.rglob("*"), folder / "ran"})
