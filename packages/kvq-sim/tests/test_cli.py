"""CLI: the main command works in all formats; bad input gives one line on stderr and exit code 2."""

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from kvq_sim.cli import main


def run(*args):
    return CliRunner().invoke(main, list(args))


def test_plan_table_json_csv():
    r = run("plan", "--model", "llama-7b", "--gpu", "a100-80g", "--bits", "2")
    assert r.exit_code == 0 and "max context at batch 1" in r.output and "assumptions:" in r.output
    j = json.loads(run("plan", "--model", "llama-7b", "--gpu", "a100-80g", "--bits", "2", "--format", "json").stdout)
    assert j["method"] == "kivi" and j["fits"] and j["memory"]["total_bytes"] <= j["memory"]["usable_bytes"]
    c = run(
        "plan", "--model", "llama-7b", "--gpu", "a100-80g", "--bits", "k2v1.5", "--method", "skvq", "--format", "csv"
    )
    assert c.exit_code == 0 and len(c.stdout.strip().splitlines()) == 2


def test_plan_workload_and_parallel():
    r = run(
        "plan", "--model", "llama-2-70b", "--gpu", "8x-h100", "--bits", "4", "--prompt", "8000", "--generate", "192"
    )
    assert r.exit_code == 0 and "max batch at 8,192 tokens" in r.output and "prefill" in r.output
    r = run("plan", "--model", "llama-7b", "--gpu", "8x-a100-80g", "--bits", "2", "--parallel", "cp", "--batch", "1")
    assert r.exit_code == 0 and "8 GPUs cp" in r.output


def test_list():
    for what, needle in (("gpus", "h200"), ("models", "mixtral-8x7b"), ("methods", "skvq")):
        r = run("list", what)
        assert r.exit_code == 0 and needle in r.output


BAD = [
    (["--model", "llama-9b", "--gpu", "a100-80g"], "unknown model 'llama-9b'; valid: "),
    (["--model", "llama-7b", "--gpu", "a100"], "unknown GPU 'a100'; valid: "),
    (["--model", "llama-7b", "--gpu", "a100-80g", "--method", "foo"], "unknown method 'foo'; valid: "),
    (["--model", "llama-7b", "--gpu", "a100-80g", "--bits", "5"], "no method stores 5-bit KV"),
    (["--model", "llama-7b", "--gpu", "a100-80g", "--bits", "two"], "cannot read bits"),
    (["--model", "llama-7b", "--gpu", "a100-80g", "--context", "0"], "context must be an integer in 1.."),
    (["--model", "llama-7b", "--gpu", "a100-80g", "--batch", "-3"], "batch must be an integer in 1.."),
    (["--model", "llama-7b", "--gpu", "a100-80g", "--context", "10000000000000"], "context must be"),
    (["--model", "llama-2-70b", "--gpu", "l40s"], "weights alone need 128."),
    (["--model", "llama-2-70b", "--gpu", "8x-h100", "--gpus", "3"], "tensor parallel 3 does not divide"),
    (["--model", "llama-7b", "--gpu", "a100-80g", "--gpus", "2"], ""),  # a single-GPU config may be replicated
    (["--model", "llama-7b", "--gpu", "a100-80g", "--method", "", "--bits", "4"], "unknown method ''; valid: "),
    (
        ["--model", "llama-7b", "--gpu", "a100-80g", "--bits", "2", "--shared-prefix-tokens", "100000000"],
        "shared prefix of 100,000,000 tokens does not fit: at most ",
    ),
    (["--model", "llama-7b", "--gpu", "a100-80g", "--bits", "2", "--shared-prefix-tokens", "1000"], ""),
]


@pytest.mark.parametrize("args,message", BAD)
def test_bad_input_one_line_exit_2(args, message):
    r = run("plan", *args)
    if not message:
        assert r.exit_code == 0
        return
    assert r.exit_code == 2, r.output
    assert r.stderr.startswith("error: ") and message in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "Traceback" not in r.output


def test_malformed_and_invalid_yaml(tmp_path):
    p = tmp_path / "mine.yaml"
    p.write_text("description: [oops\n")
    r = run("plan", "--model", "llama-7b", "--gpu", str(p))
    assert r.exit_code == 2 and "mine.yaml: line" in r.stderr and "malformed YAML" in r.stderr
    p.write_text("base: a100-80g\nhbm_bandwidth_gb_s: fast\n")
    r = run("plan", "--model", "llama-7b", "--gpu", str(p))
    assert r.exit_code == 2 and "mine.yaml: field 'hbm_bandwidth_gb_s' must be a positive number" in r.stderr
    p.write_text("base: b100\n")
    r = run("plan", "--model", "llama-7b", "--gpu", str(p))
    assert r.exit_code == 2 and "field 'base' names unknown GPU 'b100'; valid: " in r.stderr
    cfg = tmp_path / "config.json"
    cfg.write_text('{"hidden_size": 4096}')
    r = run("plan", "--model", str(cfg), "--gpu", "a100-80g")
    assert r.exit_code == 2 and "config.json: missing field 'num_attention_heads'" in r.stderr


def test_plan_imports_no_torch_or_triton():
    code = (
        "import sys\n"
        "from kvq_sim.cli import main\n"
        "try:\n"
        "    main(['plan', '--model', 'llama-7b', '--gpu', 'a100-80g', '--bits', '2'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('HEAVY', sorted(m for m in ('torch', 'triton', 'pandas') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "HEAVY []"


def test_a_format_that_does_not_fit_the_heads_is_one_line_exit_2(tmp_path):
    """MILLION's product quantizer splits head_dim into 4-channel subspaces: a model of head_dim 6 cannot use it."""
    model = tmp_path / "head6.yaml"
    model.write_text(
        "num_hidden_layers: 2\nhidden_size: 48\nnum_attention_heads: 8\nnum_key_value_heads: 8\nhead_dim: 6\n"
        "intermediate_size: 128\nvocab_size: 1000\nmax_position_embeddings: 4096\n"
    )
    pdf = tmp_path / "x.pdf"
    for args in (["plan", "--method", "million", "--bits", "2"], ["report", "--methods", "million:2", "-o", str(pdf)]):
        r = run(*args, "--model", str(model), "--gpu", "h100-80g")
        assert r.exit_code == 2, r.output
        assert r.exception is None or isinstance(r.exception, SystemExit), r.exc_info
        assert "million cannot store head6's KV: head_dim 6 is not a multiple of pq subspace_dims 4" in r.output
    assert not pdf.exists()


@pytest.mark.parametrize(
    "args,message",
    [
        (["validate", "--published", "--max-mape", "nan"], "'--max-mape': expected a finite percentage >= 0, got nan"),
        (["validate", "--published", "--max-class-bias", "-1"], "'--max-class-bias': expected a finite percentage"),
        (["report", "--model", "llama-7b", "--gpu", "a100-80g", "--measurements", "/no/such/dir", "-o", "{out}"],
         "'--measurements': /no/such/dir is not a folder"),
        (["report", "--model", "llama-7b", "--gpu", "a100-80g", "--quality", "/no/such/dir", "-o", "{out}"],
         "'--quality': /no/such/dir is not a folder"),
    ],
)  # fmt: skip
def test_thresholds_and_named_folders_are_checked(tmp_path, args, message):
    out = tmp_path / "r.pdf"
    r = run(*(a.format(out=out) for a in args))
    assert r.exit_code == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.output
    assert not out.exists()
