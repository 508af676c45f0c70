"""`kvq-eval`: the console script exists, bad input is one line on stderr with exit 2, CSV rows carry provenance.

End-to-end runs use a tiny random Llama saved with a word-level tokenizer (`--model DIR`), so they take
seconds; the real SmolLM2 runs are tests/test_generate_smollm2.py and tests/test_quality_slice.py.
"""

from __future__ import annotations

import csv
import importlib.metadata
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kvq_core import cli_eval
from kvq_core.cli_eval import CSV_COLUMNS, GENERATE_COLUMNS, append_csv, main, parse_cache

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
WORDS = [f"w{i}" for i in range(90)]


def run(argv, capsys) -> tuple[int, str, str]:
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def assert_usage_error(rc: int, err: str, *fragments: str) -> None:
    assert rc == 2
    ours = [line for line in err.splitlines() if line.startswith("kvq-eval:")]  # model loading may draw bars
    assert len(ours) == 1 and ours[0].startswith("kvq-eval: error: ") and err.strip().endswith(ours[0]), err
    for fragment in fragments:
        assert fragment in ours[0]
    assert "Traceback" not in err


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, make_tiny_llama):
    """A directory holding a tiny random Llama (2 layers, 2 KV heads x 16) and a word-level tokenizer."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    path = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_llama(max_positions=1024).save_pretrained(path)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]", *WORDS])}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[UNK]").save_pretrained(
        path
    )
    return path


def text_file(tmp_path: Path, tokens: int, seed: int = 0) -> Path:
    """A text of `tokens` words; texts of different seeds share no run of 64 words (calibration vs evaluation)."""
    path = tmp_path / f"text{tokens}-{seed}.txt"
    path.write_text(" ".join(WORDS[(7 * i * i + (1 + 2 * seed) * i) % len(WORDS)] for i in range(tokens)))
    return path


#: calibration options for the tiny model's texts: 2 sequences of 40 tokens of a text disjoint from text_file's
def calibration_args(tmp_path: Path) -> list[str]:
    text = text_file(tmp_path, 120, seed=1)
    return ["--calibration-text", str(text), "--calibration-sequences", "2", "--calibration-length", "40"]


# -- the entry point ------------------------------------------------------------------------------
def test_console_script_is_declared_and_installed():
    text = PYPROJECT.read_text()  # tomllib is 3.11+; kvq-core supports 3.10
    assert '[project.scripts]\nkvq-eval = "kvq_core.cli_eval:main"\n' in text
    installed = importlib.metadata.entry_points(group="console_scripts", name="kvq-eval")
    assert [ep.value for ep in installed] == ["kvq_core.cli_eval:main"], "re-run pip install -e packages/kvq-core"


def test_help_runs_from_the_console_script():
    exe = shutil.which("kvq-eval")
    assert exe is not None, "kvq-eval not on PATH: pip install -e packages/kvq-core --no-deps"
    res = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "--protocol {decode,teacher-forced,both}" in res.stdout
    assert "quanto:2" in res.stdout


def test_help_does_not_import_torch():
    code = "import sys; from kvq_core import cli_eval; print('torch' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "False"


# -- cache names ------------------------------------------------------------------------------------
def test_cache_names():
    assert parse_cache("quanto:2").peer == "quanto-2"
    assert parse_cache("fp8").peer == "fp8"
    assert parse_cache("full").label == "full"
    assert parse_cache("kivi:2").label == "kvq:kivi-2"
    assert parse_cache("skvq:k2v1.5").fmt.name == "skvq-k2v1.5"
    assert all(parse_cache(name).fmt is not None for name in cli_eval.every_kvq_cache())


# -- bad input: one line, exit 2, no traceback -----------------------------------------------------
@pytest.mark.parametrize(
    "argv,fragment",
    [
        (["nosuch:2"], "unknown cache 'nosuch:2'"),
        (["kivi:5"], "no 5-bit variant"),
        (["quanto:3"], "valid: quanto:2, quanto:4"),
        (["hqq"], "no variant 'hqq'"),
        ([], "name at least one cache"),
        (["kivi:2", "--windows", "0"], "--windows"),
        (["kivi:2", "--text", "/nonexistent/text.txt"], "--text /nonexistent/text.txt"),
        (["kivi:2", "--model", "/nonexistent/model"], "not a directory"),
        (["kivi:2", "--calibration", "/nonexistent/calib.pt"], "does not exist"),
        ([":"], "cache ':' names no method"),
        (["kivi:2", "--calibration-text", "/nonexistent/c.txt"], "--calibration-text /nonexistent/c.txt"),
    ],
    ids=[
        "unknown-method",
        "bad-bits",
        "bad-peer-bits",
        "peer-without-bits",
        "no-cache",
        "windows",
        "text",
        "model",
        "calib",
        "no-method",
        "calibration-text",
    ],
)
def test_bad_input_is_one_line_and_exit_2(capsys, argv, fragment):
    rc, _, err = run(argv, capsys)
    assert_usage_error(rc, err, fragment)


def test_generate_bad_cache(capsys):
    rc, _, err = run(["generate", "kivi:7"], capsys)
    assert_usage_error(rc, err, "no 7-bit variant")


def test_directory_that_is_not_a_causal_lm(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5"}))
    rc, _, err = run(["kivi:2", "--model", str(tmp_path)], capsys)
    assert_usage_error(rc, err, "'t5' model is not a causal LM")


def test_directory_without_config(capsys, tmp_path):
    rc, _, err = run(["kivi:2", "--model", str(tmp_path)], capsys)
    assert_usage_error(rc, err, "no config.json")


def test_text_shorter_than_one_window(capsys, tmp_path, tiny_dir):
    argv = ["kivi:2", "--model", str(tiny_dir), "--text", str(text_file(tmp_path, 100)), "--prefill", "384"]
    rc, _, err = run(argv, capsys)  # decode needs 8 windows of 384 + 128
    assert_usage_error(rc, err, "text too short: 100 tokens", "needs 4096")


def test_calibration_text_overlapping_the_windows_is_refused(capsys, tmp_path, tiny_dir):
    text = str(text_file(tmp_path, 300))
    argv = ["kivi:2", "kvquant:2", "--model", str(tiny_dir), "--text", text, "--calibration-text", text]
    argv += ["--calibration-sequences", "2", "--calibration-length", "80", "--prefill", "80", "--scored", "8"]
    rc, _, err = run([*argv, "--windows", "2", "--no-progress"], capsys)
    assert_usage_error(rc, err, "calibration sequence 0 shares 64 tokens", "with an evaluated window")


def test_calibration_file_from_another_model(capsys, tmp_path, tiny_dir):
    import transformers

    from kvq_core.calibration_file import save_calibration

    other = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2
        )
    )
    path = tmp_path / "other.safetensors"
    save_calibration({}, path, model=other)
    text = text_file(tmp_path, 200)
    argv = ["kvquant:2", "--model", str(tiny_dir), "--text", str(text), "--calibration", str(path), "--start", "0"]
    argv += calibration_args(tmp_path)
    rc, _, err = run([*argv, "--prefill", "32", "--scored", "8"], capsys)
    assert_usage_error(rc, err, "was made for model llama:L3")


# -- CSV rows -----------------------------------------------------------------------------------------
def test_both_protocols_write_rows_with_provenance(capsys, tmp_path, tiny_dir):
    out = tmp_path / "q.csv"
    argv = ["kivi:2", "kvquant:2", "--protocol", "both", "--model", str(tiny_dir), *calibration_args(tmp_path)]
    argv += ["--text", str(text_file(tmp_path, 300))]
    argv += ["--start", "0", "--prefill", "40", "--scored", "24", "--window", "64", "--windows", "2"]
    rc, stdout, err = run([*argv, "--no-progress", "--csv", str(out)], capsys)
    assert rc == 0, err
    with out.open(newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert tuple(reader.fieldnames) == CSV_COLUMNS
    assert [(r["cache"], r["protocol"]) for r in rows] == [
        (c, p) for c in ("full", "kvq:kivi-2", "kvq:kvquant-nuq2-1%") for p in ("decode", "teacher-forced")
    ]
    for r in rows:
        assert float(r["ppl"]) > 1 and r["torch"] and r["transformers"] and r["commit"] and r["date"]
        assert r["dirty"] in ("True", "False") and r["python"]
        assert float(r["change_low"]) <= float(r["change"]) <= float(r["change_high"])
        assert len(r["window_nll"].split()) == 2 and r["window_starts"] == (
            "0 236" if r["protocol"] == "decode" else "0 64"  # decode: spread to the text's end; 300 - 64 = 236
        )
        assert r["params"] == ("prefill=40 scored=24" if r["protocol"] == "decode" else "window=64 prefix=1 chunk=16")
    assert {r["scored_tokens"] for r in rows} == {"48", "126"}  # 2 x 24 decode, 2 x 63 teacher-forced
    assert rows[0]["avg_bits"] == "32.000"  # fp32 DynamicCache, measured
    assert rows[4]["calibration"].startswith("2 x 40 tokens") and "(78 fitted)" in rows[4]["calibration"]
    assert rows[2]["calibration"] == "none" and rows[0]["change"] == "0.00000"  # the full cache: the reference
    assert "avg bits" in stdout.splitlines()[0]
    # the full-precision cache equals the cache-free forward; a 2-bit cache is worse on random weights too
    assert float(rows[1]["ppl"]) < float(rows[3]["ppl"]) * 1.5


def test_generate_rows(capsys, tmp_path, tiny_dir):
    out = tmp_path / "g.csv"
    argv = ["generate", "kivi:8", "--model", str(tiny_dir), "--text", str(text_file(tmp_path, 100))]
    rc, _, err = run([*argv, "--start", "0", "--prompt-tokens", "40", "--new-tokens", "8", "--csv", str(out)], capsys)
    assert rc == 0, err
    with out.open(newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert tuple(reader.fieldnames) == GENERATE_COLUMNS
    assert [r["cache"] for r in rows] == ["full", "kvq:kivi-8"]  # the full cache always runs first
    assert rows[0]["agree_with_full"] == "1.0000" and rows[0]["new_tokens"] == "8"


def test_append_keeps_old_rows_byte_for_byte(tmp_path):
    path = tmp_path / "q.csv"
    append_csv(path, {c: "1" for c in CSV_COLUMNS}, CSV_COLUMNS)
    first = path.read_bytes()
    assert first.startswith(b"cache,method,bits,") and first.count(b"\r\n") == 2
    path.write_bytes(first[:-2])  # a file whose last row lacks its line end
    append_csv(path, {c: "2" for c in CSV_COLUMNS}, CSV_COLUMNS)
    assert path.read_bytes() == first + b",".join([b"2"] * len(CSV_COLUMNS)) + b"\r\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.csv"]  # the temporary file was renamed


@pytest.mark.parametrize(
    "content,fragment",
    [
        ("cache,ppl,cpu\r\nkvq:int4,13.9,x86_64\r\n", "header 'cache,ppl,cpu'"),  # an older schema is not widened
        (",".join(GENERATE_COLUMNS) + "\r\n", "header 'cache,method,bits,avg_bits"),  # generate's CSV
        (",".join(CSV_COLUMNS) + "\r\nkvq:x,kivi\r\n", f"row 2 has 2 fields, the header {len(CSV_COLUMNS)}"),
        ("caf\xe9".encode("latin-1"), "not UTF-8"),
    ],
    ids=["older-schema", "generate-csv", "short-row", "latin-1"],
)
def test_append_refuses_another_schema_and_leaves_it(tmp_path, content, fragment):
    path = tmp_path / "other.csv"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    before = path.read_bytes()
    with pytest.raises(cli_eval.UsageError, match="not a kvq-eval CSV|row 2") as e:
        append_csv(path, {c: "1" for c in CSV_COLUMNS}, CSV_COLUMNS)
    assert fragment in str(e.value) and path.read_bytes() == before


def test_calibration_file_through_the_cli(capsys, tmp_path, tiny_dir):
    """A saved kvquant calibration is used as saved (no re-fit); a file for another method is refused."""
    import torch

    from kvq_core.calibration import calibrate
    from kvq_core.calibration_file import save_calibration

    model = cli_eval.load_model(tiny_dir)[0]
    state = calibrate(model, torch.randint(1, 91, (1, 40)), "kvquant", 2, fisher=False)
    path = tmp_path / "kvquant2.safetensors"
    save_calibration(state, path, model=model)
    out = tmp_path / "q.csv"
    argv = ["--model", str(tiny_dir), "--text", str(text_file(tmp_path, 60)), "--calibration", str(path)]
    argv += ["--start", "0", "--prefill", "20", "--scored", "8", "--windows", "1", "--no-progress", "--csv", str(out)]
    argv += calibration_args(tmp_path)
    rc, _, err = run(["kvquant:2", *argv], capsys)
    assert rc == 0, err
    with out.open(newline="") as f:
        assert [r["calibration"] for r in csv.DictReader(f)] == ["none", str(path)]  # full, kvquant:2
    rc, _, err = run(["skvq:2", *argv], capsys)
    assert_usage_error(rc, err, "0.k holds codebook, static_scale, static_zero; skvq-2 needs clip_ratio, reorder")
    rc, _, err = run(["kivi:2", *argv], capsys)
    assert_usage_error(rc, err, "none of full, kivi:2 uses calibration state")


def test_window_beyond_the_models_positions(capsys, tmp_path, tiny_dir):
    argv = ["kivi:2", "--model", str(tiny_dir), "--text", str(text_file(tmp_path, 60)), "--start", "0"]
    rc, _, err = run([*argv, "--prefill", "1000", "--scored", "25", *calibration_args(tmp_path)], capsys)
    assert_usage_error(rc, err, "(--prefill 1000 + --scored 25) is 1025 tokens, beyond the model's 1024 positions")


def test_avg_bits_charge_x_caching_formats_by_the_models_hidden_size(tiny_dir):
    """XQuant stores hidden_size channels per token: on this GQA model (64 hidden, 2 x 2 x 16 K/V channels) its
    bits per K/V element are the format's bytes at hidden_size 64, not the one-head-per-KV-head default."""
    from kvq_core.cli_eval import CacheMaker, load_model, parse_cache

    model = load_model(tiny_dir)[0]
    spec = parse_cache("xquant:4")
    got = CacheMaker(spec, model, None, None).avg_bits(128, None)
    assert got == pytest.approx(spec.fmt.avg_bits(128, 2, 16, 64))
    assert got > spec.fmt.avg_bits(128, 2, 16)  # 64 X channels > 2 * 2 * 16 / 2 per K or V


#: Numeric columns batched against one window at a time: a batched forward is another fp32 matmul shape, whose
#: rounding can differ in the last printed digit (single-threaded CPU torch: ppl 110.6294 against 110.6293, 9e-7
#: relative); the bound is test_eval_batched.REL_TOL, the per-window NLL tolerance of the same comparison.
BATCHED_REL_TOL = 2e-5
BATCHED_NUMERIC = ("ppl", "nll", "change", "change_low", "change_high", "avg_bits", "held_bits_per_element")


def _same_row(got: dict, want: dict) -> bool:
    """Text columns equal; numeric ones (BATCHED_NUMERIC, and each number of window_nll) within BATCHED_REL_TOL,
    or 1e-5 absolute for values printed as zero."""

    def close(a: str, b: str) -> bool:
        return float(a) == pytest.approx(float(b), rel=BATCHED_REL_TOL, abs=1e-5)

    for k, v in want.items():
        if k in BATCHED_NUMERIC:
            ok = close(got[k], v)
        elif k == "window_nll":
            ok = len(got[k].split()) == len(v.split()) and all(map(close, got[k].split(), v.split()))
        else:
            ok = got[k] == v
        if not ok:
            return False
    return True


def test_batch_option_keeps_every_number(capsys, tmp_path, tiny_dir):
    # windows batched (default) or one at a time (--batch 1): the same rows but for the seconds and provenance, and
    # numbers within the rounding of a batched matmul (BATCHED_REL_TOL)
    argv = ["kivi:2", "int:4", "fp8", "--protocol", "both", "--model", str(tiny_dir), *calibration_args(tmp_path)]
    argv += ["--text", str(text_file(tmp_path, 400)), "--prefill", "40", "--scored", "24", "--window", "64"]
    argv += ["--windows", "3", "--no-progress"]
    rows = {}
    for extra in ([], ["--batch", "1"], ["--batch", "2"]):
        out = tmp_path / f"b{len(extra)}{extra[-1:]}.csv"
        rc, _, err = run([*argv, *extra, "--csv", str(out)], capsys)
        assert rc == 0, err
        with out.open(newline="") as f:
            rows[tuple(extra)] = list(csv.DictReader(f))
    keep = ("cache", "protocol", "ppl", "nll", "change", "change_low", "change_high", "avg_bits")
    keep += ("held_bits_per_element", "scored_tokens", "windows", "window_starts", "window_nll", "params")
    want = [{k: r[k] for k in keep} for r in rows[("--batch", "1")]]
    for got in rows.values():
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert _same_row({k: g[k] for k in keep}, w), (g, w)
    # the comparison can fail: a changed last digit beyond the tolerance, or a different scored count
    assert not _same_row({**want[0], "ppl": f"{float(want[0]['ppl']) * 1.001:.4f}"}, want[0])
    assert not _same_row({**want[0], "scored_tokens": "71"}, want[0])
    rc, _, err = run([*argv, "--batch", "0"], capsys)
    assert_usage_error(rc, err, "--batch")


def test_unweighted_calibration_fits_without_fisher_weights_and_says_so(capsys, tmp_path, tiny_dir):
    """--unweighted-calibration changes the fit (a codebook fitted without the Fisher weights) and the row's
    calibration column names it; a saved calibration file cannot be re-weighted and is refused with it."""
    argv = ["kvquant:2", "--model", str(tiny_dir), *calibration_args(tmp_path), "--text", str(text_file(tmp_path, 300))]
    argv += ["--start", "0", "--prefill", "40", "--scored", "24", "--windows", "2", "--no-progress"]
    rows = {}
    for flag in ([], ["--unweighted-calibration"]):
        out = tmp_path / f"q{len(flag)}.csv"
        rc, _, err = run([*argv, *flag, "--csv", str(out)], capsys)
        assert rc == 0, err
        with out.open(newline="") as f:
            rows[bool(flag)] = [r for r in csv.DictReader(f) if r["cache"] != "full"][0]
    assert rows[False]["calibration"].endswith("fitted), Fisher")
    assert rows[True]["calibration"].endswith("fitted), unweighted")
    assert rows[True]["nll"] != rows[False]["nll"]
    rc, _, err = run([*argv, "--unweighted-calibration", "--calibration", str(tmp_path / "any.safetensors")], capsys)
    assert_usage_error(rc, err, "--unweighted-calibration fits here")
