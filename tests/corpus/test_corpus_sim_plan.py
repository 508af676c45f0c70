"""Bad-input corpus for `kvq-sim plan` / `kvq-sim list`, hardware YAML and model config.json / YAML files.

Each bad case runs the CLI in a subprocess and must fail cleanly (tests/corpus/conftest.py): exit 2, one stderr
line naming the problem, no traceback, and no config file changed. Case ids that name a reported bad input
carry that example's words (`bits-0-silently-picked-eviction`, `hbm_bandwith_gb_s-misspelt`, ...). Positive
controls at the end prove the harness can see a working run.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*/*.yaml"))
SIM = "kvq_sim.cli"
PLAN = ["plan", "--model", "llama-7b", "--gpu", "a100-80g"]
POSITIONS = "--prompt", "--generate", "--gen-tokens"

# --- CLI options of `plan` and `list`: (id, args, message regex) ----------------------------------------------
OPTIONS = [
    ("bits-0-silently-picked-eviction", [*PLAN, "--bits", "0"], r"--bits 0 stores no KV: it is eviction.*--method h2o"),
    ("bits-k0v0-bare", [*PLAN, "--bits", "k0v0"], r"--bits k0v0 stores no KV"),
    ("bits-0-with-kivi", [*PLAN, "--bits", "0", "--method", "kivi"], r"method 'kivi' has no 0-bit variant; valid bits: 2, 3, 4, 8"),
    ("bits-2-with-h2o", [*PLAN, "--bits", "2", "--method", "h2o"], r"method 'h2o' has no 2-bit variant; valid bits: 0"),
    ("bits-1.5-bare-picks-no-method", [*PLAN, "--bits", "1.5"], r"--bits 1.5 is not a width of kivi.*--method \(vidkv\)"),
    ("bits-k2v1.5-bare", [*PLAN, "--bits", "k2v1.5"], r".*stores k2v1.5-bit KV with --method \(skvq\)"),
    ("bits-k4v8-bare", [*PLAN, "--bits", "k4v8"], r"--bits k4v8 is not a width of kivi.*--method \(bfp\)"),
    ("bits-5-no-method", [*PLAN, "--bits", "5"], r"no method stores 5-bit KV; valid bits: "),
    ("bits-negative", [*PLAN, "--bits", "-2"], r"no method stores -2-bit KV"),
    ("bits-nan", [*PLAN, "--bits", "nan"], r"cannot read bits 'nan': use a number"),
    ("bits-inf", [*PLAN, "--bits", "inf"], r"cannot read bits 'inf': use a number"),
    ("bits-text", [*PLAN, "--bits", "two"], r"cannot read bits 'two'"),
    ("bits-empty", [*PLAN, "--bits", ""], r"cannot read bits ''"),
    ("bits-k-without-v", [*PLAN, "--bits", "k2"], r"cannot read bits 'k2'"),
    ("bits-16-with-kivi", [*PLAN, "--bits", "16", "--method", "kivi"], r"method 'kivi' has no 16-bit variant"),
    ("bits-3-with-fp8", [*PLAN, "--bits", "3", "--method", "fp8-e4m3"], r"method 'fp8-e4m3' has no 3-bit variant; valid bits: 8"),
    ("method-unknown", [*PLAN, "--method", "kivi2"], r"unknown method 'kivi2'; valid: fp16, int, "),
    ("method-wrong-case", [*PLAN, "--method", "KIVI"], r"unknown method 'KIVI'; valid: "),
    ("recipe-unknown", [*PLAN, "--recipe", "qserve"], r"unknown recipe 'qserve'; valid: qserve-w4a8kv4"),
    ("recipe-with-bits", [*PLAN, "--recipe", "qserve-w4a8kv4", "--bits", "2"], r"--recipe qserve-w4a8kv4 sets the KV method and bits"),
    ("recipe-with-other-weight-bits", [*PLAN, "--recipe", "qserve-w4a8kv4", "--weight-bits", "8"], r"--recipe qserve-w4a8kv4 has 4-bit weights; drop --weight-bits 8"),
    ("weight-bits-3", [*PLAN, "--weight-bits", "3"], r"weight bits must be one of 16, 8, 4, 2, got 3"),
    ("weight-bits-text", [*PLAN, "--weight-bits", "four"], r"Invalid value for '--weight-bits': 'four' is not a valid integer"),
    ("batch-16777216-x-0-tokens", [*PLAN, "--batch", "16777216"], r"batch 16,777,216 does not fit a100-80g even at 1 token per sequence: at most [\d,]+ sequences fit"),
    ("batch-above-limit", [*PLAN, "--batch", "16777217"], r"batch must be an integer in 1..16,777,216, got 16777217"),
    ("batch-zero", [*PLAN, "--batch", "0"], r"batch must be an integer in 1..16,777,216, got 0"),
    ("batch-negative", [*PLAN, "--batch", "-3"], r"batch must be an integer in 1.., got -3|batch must be an integer in 1..16,777,216, got -3"),
    ("batch-float", [*PLAN, "--batch", "1.5"], r"Invalid value for '--batch': '1.5' is not a valid integer"),
    ("batch-huge-digits", [*PLAN, "--batch", "9" * 40], r"batch must be an integer in 1..16,777,216"),
    ("context-zero", [*PLAN, "--context", "0"], r"context must be an integer in 1..17,179,869,184, got 0"),
    ("context-negative", [*PLAN, "--context", "-1"], r"context must be an integer in 1..17,179,869,184, got -1"),
    ("context-above-limit", [*PLAN, "--context", "17179869185"], r"context must be an integer in 1..17,179,869,184"),
    ("context-text", [*PLAN, "--context", "128k"], r"Invalid value for '--context': '128k' is not a valid integer"),
    ("context-and-prompt", [*PLAN, "--context", "100", "--prompt", "10", "--generate", "10"], r"give either --context or --prompt/--generate, not both"),
    ("prompt-without-generate", [*PLAN, "--prompt", "1000"], r"give both --prompt and --generate \(a workload\), or neither"),
    ("generate-without-prompt", [*PLAN, "--generate", "1000"], r"give both --prompt and --generate"),
    ("prompt-zero", [*PLAN, "--prompt", "0", "--generate", "1"], r"prompt must be an integer in 1.."),
    ("generate-negative", [*PLAN, "--prompt", "10", "--generate", "-1"], r"generate must be an integer in 1.."),
    ("generate-above-context-limit", [*PLAN, "--prompt", "10", "--generate", "17179869185"], r"generate must be an integer in 1..17,179,869,184"),
    ("prompt-plus-generate-above-limit", [*PLAN, "--prompt", "1", "--generate", "17179869184"], r"prompt \+ generated tokens = 17,179,869,185 exceeds the context limit of 17,179,869,184"),
    ("gen-tokens-zero", [*PLAN, "--prompt", "10", "--gen-tokens", "0"], r"gen-tokens must be an integer in 1.."),
    ("gen-tokens-above-limit", [*PLAN, "--prompt", "10", "--gen-tokens", "17179869185"], r"gen-tokens must be an integer in 1..17,179,869,184"),
    ("gen-tokens-without-prompt", [*PLAN, "--gen-tokens", "100"], r"--gen-tokens needs --prompt"),
    ("gen-tokens-and-generate", [*PLAN, "--prompt", "10", "--generate", "5", "--gen-tokens", "5"], r"give either --generate or --gen-tokens, not both"),
    ("shared-prefix-negative", [*PLAN, "--shared-prefix-tokens", "-1"], r"shared-prefix-tokens must be an integer in 0..17,179,869,184, got -1"),
    ("shared-prefix-above-context", [*PLAN, "--context", "100", "--shared-prefix-tokens", "101"], r"shared prefix of 101 tokens exceeds --context 100"),
    ("shared-prefix-above-prompt", [*PLAN, "--prompt", "100", "--generate", "10", "--shared-prefix-tokens", "101"], r"shared prefix of 101 tokens exceeds --prompt 100"),
    ("prefix-reads-without-prefix", [*PLAN, "--prefix-reads", "shared"], r"--prefix-reads needs --shared-prefix-tokens"),
    ("prefix-reads-unknown", [*PLAN, "--prefix-reads", "once"], r"Invalid value for '--prefix-reads': 'once' is not one of"),
    ("gpus-zero", [*PLAN, "--gpus", "0"], r"gpus must be in 1..1024, got 0"),
    ("gpus-above-limit", [*PLAN, "--gpus", "2048"], r"gpus must be in 1..1024, got 2048"),
    ("gpus-more-than-node", ["plan", "--model", "llama-7b", "--gpu", "8x-h100", "--gpus", "16"], r"8x-h100 has 8 GPUs, asked for 16"),
    ("gpus-not-dividing-heads", ["plan", "--model", "llama-2-70b", "--gpu", "8x-h100", "--gpus", "3"], r"tensor parallel 3 does not divide llama-2-70b's 64 heads"),
    ("parallel-unknown", [*PLAN, "--parallel", "pp"], r"Invalid value for '--parallel': 'pp' is not one of 'tp', 'cp'"),
    ("format-unknown", [*PLAN, "--format", "xml"], r"Invalid value for '--format': 'xml' is not one of 'table', 'json', 'csv'"),
    ("option-misspelt", [*PLAN, "--bacth", "3"], r"No such option '--bacth'.*--batch"),
    ("model-missing", ["plan", "--gpu", "a100-80g"], r"Missing option '--model'"),
    ("gpu-missing", ["plan", "--model", "llama-7b"], r"Missing option '--gpu'"),
    ("model-unknown-lists-valid", ["plan", "--model", "llama-9b", "--gpu", "a100-80g"], r"unknown model 'llama-9b'; valid: llama-2-13b, .*smollm2-135m"),
    ("model-empty-name", ["plan", "--model", "", "--gpu", "a100-80g"], r"unknown model ''; valid: "),
    ("gpu-unknown-lists-valid", ["plan", "--model", "llama-7b", "--gpu", "b200"], r"unknown GPU 'b200'; valid: 4x-l40s, .*l40s"),
    ("gpu-near-name-not-guessed", ["plan", "--model", "llama-7b", "--gpu", "h100"], r"unknown GPU 'h100'; valid: "),
    ("gpu-file-not-found", ["plan", "--model", "llama-7b", "--gpu", "no/such.yaml"], r"GPU config file not found: no/such.yaml"),
    ("model-file-not-found", ["plan", "--model", "nowhere/config.json", "--gpu", "a100-80g"], r"model config file not found"),
    ("weights-do-not-fit", ["plan", "--model", "llama-2-70b", "--gpu", "l40s"], r"llama-2-70b at 16-bit weights does not fit l40s: weights alone need 128\.\d\d GiB"),
    ("context-beyond-max-position-strict", ["plan", "--model", "llama-3-8b", "--gpu", "h100-80g", "--bits", "2", "--context", "2752640", "--strict-context"], r"2,752,640 tokens per sequence exceed llama-3-8b's max_position_embeddings \(8,192\).*--strict-context"),
    ("workload-beyond-max-position-strict", ["plan", "--model", "llama-7b", "--gpu", "a100-80g", "--prompt", "2000", "--gen-tokens", "100", "--strict-context"], r"2,100 tokens per sequence exceed llama-7b's max_position_embeddings \(2,048\)"),
    ("list-unknown-kind", ["list", "gpu"], r"Invalid value for .*'gpu' is not one of 'gpus', 'models', 'methods', 'recipes'"),
    ("list-missing-kind", ["list"], r"Missing argument"),
    ("command-unknown", ["plna"], r"No such command 'plna'"),
]  # fmt: skip


@pytest.mark.parametrize("args,message", [c[1:] for c in OPTIONS], ids=[c[0] for c in OPTIONS])
def test_bad_plan_and_list_options(cli, tmp_path, args, message):
    before = cli.snapshot(CONFIGS)
    r = cli.run(SIM, args, cwd=tmp_path)
    cli.fails(r, "^error: " + message, before=before, code=2)


# --- hardware YAML given with --gpu <path>: (id, file text, message regex) ------------------------------------
BASE = "base: h100-80g\n"
HARDWARE = [
    ("hbm_bandwith_gb_s-misspelt", BASE + "hbm_bandwith_gb_s: 3900\n", r"unknown field 'hbm_bandwith_gb_s'; did you mean 'hbm_bandwidth_gb_s'\?"),
    ("calibration-field-misspelt", BASE + "calibration:\n  cuda_contex_mib: 100\n", r"unknown field 'calibration.cuda_contex_mib'; did you mean 'cuda_context_mib'"),
    ("bandwidth-efficiency-key-misspelt", BASE + "calibration:\n  bandwidth_efficiency: {weight_gemm: 0.9}\n", r"unknown field 'calibration.bandwidth_efficiency.weight_gemm'; did you mean 'weight_gemv'"),
    ("kernel-fit-field-misspelt", BASE + "calibration:\n  attention_kernels:\n    kvq_fp16: {bound: bandwidth, overhead: 5}\n", r"unknown field 'calibration.attention_kernels.kvq_fp16.overhead'; did you mean 'overhead_us'"),
    ("unknown-field-no-close-name", BASE + "colour: green\n", r"unknown field 'colour'; known fields: base, boost_clock_mhz"),
    ("bandwidth-1e-300-305-digit-time", BASE + "hbm_bandwidth_gb_s: 1.0e-300\n", r"field 'hbm_bandwidth_gb_s' must be a positive number from 10 up to 100000, got 1e-300"),
    ("bandwidth-1e-300-as-text", BASE + "hbm_bandwidth_gb_s: 1e-300\n", r"field 'hbm_bandwidth_gb_s' must be .* got '1e-300' \(text, not a number"),
    ("bandwidth-zero", BASE + "hbm_bandwidth_gb_s: 0\n", r"field 'hbm_bandwidth_gb_s' must be a positive number from 10"),
    ("bandwidth-negative", BASE + "hbm_bandwidth_gb_s: -3350\n", r"field 'hbm_bandwidth_gb_s' must be .* got -3350"),
    ("bandwidth-nan", BASE + "hbm_bandwidth_gb_s: .nan\n", r"field 'hbm_bandwidth_gb_s' must be .* got nan"),
    ("bandwidth-inf", BASE + "hbm_bandwidth_gb_s: .inf\n", r"field 'hbm_bandwidth_gb_s' must be .* got inf"),
    ("bandwidth-in-tb-s", BASE + "hbm_bandwidth_gb_s: 3.35\n", r"field 'hbm_bandwidth_gb_s' must be a positive number from 10 .* got 3.35"),
    ("bandwidth-text", BASE + "hbm_bandwidth_gb_s: fast\n", r"field 'hbm_bandwidth_gb_s' must be .* got 'fast'"),
    ("bandwidth-bool", BASE + "hbm_bandwidth_gb_s: true\n", r"field 'hbm_bandwidth_gb_s' must be .* got True"),
    ("bandwidth-list", BASE + "hbm_bandwidth_gb_s: [3350]\n", r"field 'hbm_bandwidth_gb_s' must be a single value, got a list"),
    ("tflops-inf", BASE + "fp16_dense_tflops: .inf\n", r"field 'fp16_dense_tflops' must be .* got inf"),
    ("int8-tops-zero", BASE + "int8_dense_tops: 0\n", r"field 'int8_dense_tops' must be a positive number"),
    ("sm-count-fraction", BASE + "sm_count: 131.5\n", r"field 'sm_count' must be a positive integer .* got 131.5"),
    ("sm-count-zero", BASE + "sm_count: 0\n", r"field 'sm_count' must be a positive integer"),
    ("gpus-zero", BASE + "gpus: 0\n", r"field 'gpus' must be a positive integer from 1 up to 1024, got 0"),
    ("gpus-huge", BASE + "gpus: 100000\n", r"field 'gpus' must be a positive integer from 1 up to 1024"),
    ("usable-above-nominal", BASE + "usable_memory_bytes: 90000000000\n", r"usable_memory_bytes \(83\.82 GiB\) exceeds nominal_memory_gib \(80 GiB\)"),
    ("usable-in-gib", BASE + "usable_memory_bytes: 79\n", r"field 'usable_memory_bytes' must be a positive integer from 1\.07374e\+09"),
    ("nominal-memory-negative", BASE + "nominal_memory_gib: -80\n", r"field 'nominal_memory_gib' must be a positive number from 1"),
    ("nominal-memory-below-reserve", BASE + "nominal_memory_gib: 1\n", r"calibration reserve \(0\.75 GiB\) exceeds usable memory|must be a positive integer from"),
    ("boost-clock-in-ghz", BASE + "boost_clock_mhz: 1.98\n", r"field 'boost_clock_mhz' must be a positive number from 100"),
    ("interconnect-unknown", BASE + "interconnect: infiniband\n", r"field 'interconnect' must be one of nvlink, pcie, got 'infiniband'"),
    ("interconnect-latency-negative", BASE + "interconnect_latency_us: -1\n", r"field 'interconnect_latency_us' must be a number up to 1e\+06, got -1"),
    ("description-mapping", BASE + "description: {name: x}\n", r"field 'description' must be a single value, got a dict"),
    ("calibration-wrong-type", BASE + "calibration: 5\n", r"field 'calibration' must be a mapping of fields, got int"),
    ("calibration-empty", BASE + "calibration:\n", r"field 'calibration' must be a mapping of fields, got nothing"),
    ("bandwidth-efficiency-list", BASE + "calibration:\n  bandwidth_efficiency: [0.9]\n", r"field 'calibration.bandwidth_efficiency' must be a mapping of fields, got list"),
    ("attention-kernels-text", BASE + "calibration:\n  attention_kernels: none\n", r"field 'calibration.attention_kernels' must be a mapping of fields, got str"),
    ("kernel-family-list", BASE + "calibration:\n  attention_kernels:\n    kvq_fp16: [1]\n", r"field 'calibration.attention_kernels.kvq_fp16' must be a mapping of fields, got list"),
    ("efficiency-above-1", BASE + "calibration:\n  tensor_core_efficiency: 1.5\n", r"field 'calibration.tensor_core_efficiency' must be a positive number from 0.001 up to 1, got 1.5"),
    ("efficiency-1e-300", BASE + "calibration:\n  interconnect_efficiency: 1.0e-300\n", r"field 'calibration.interconnect_efficiency' must be a positive number from 0.001"),
    ("kernel-efficiency-nan", BASE + "calibration:\n  attention_kernels:\n    kvq_fp16: {bound: bandwidth, overhead_us: 5, bandwidth_efficiency: .nan, unpack_ps_per_kv_element: 0, dot_ps_per_q_element: 0}\n", r"field 'calibration.attention_kernels.kvq_fp16.bandwidth_efficiency' must be .* got nan"),
    ("kernel-bound-unknown", BASE + "calibration:\n  attention_kernels:\n    kvq_fp16: {bound: memory, overhead_us: 5, bandwidth_efficiency: 0.9, unpack_ps_per_kv_element: 0, dot_ps_per_q_element: 0}\n", r"field 'calibration.attention_kernels.kvq_fp16.bound' must be one of bandwidth, compute, got 'memory'"),
    ("launch-overhead-inf", BASE + "calibration:\n  kernel_launch_overhead_us: .inf\n", r"field 'calibration.kernel_launch_overhead_us' must be a number up to 10000, got inf"),
    ("calibrated-not-bool", BASE + "calibration:\n  calibrated: yes please\n", r"field 'calibration.calibrated' must be true or false, got 'yes please'"),
    ("base-unknown-gpu", "base: b100\n", r"field 'base' names unknown GPU 'b100'; valid: "),
    ("base-not-a-name", "base: [h100-80g]\n", r"field 'base' must be a single value, got a list"),
    ("base-itself-cycle", "base: my-gpu\n", r"field 'base' forms a cycle through 'my-gpu'"),
    ("no-base-missing-fields", "description: mine\nhbm_bandwidth_gb_s: 2000\n", r"missing field '.*' \(or start the file with 'base: <gpu>'"),
    ("duplicate-key", BASE + "hbm_bandwidth_gb_s: 3350\nhbm_bandwidth_gb_s: 4800\n", r"line 3: field 'hbm_bandwidth_gb_s' given twice"),
    ("malformed-yaml", "base: [h100-80g\n", r"line \d+ malformed YAML"),
    ("alias-bomb", BASE + "x: &a [1, 1, 1, 1, 1, 1, 1, 1, 1]\ny: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n", r"line \d+: YAML aliases \(\*a\) are not accepted in kvq configs"),
    ("top-level-list", "- base: h100-80g\n", r"expected a mapping of fields, got list"),
    ("empty-file", "", r"empty file, expected a mapping of fields"),
    ("5000-digit-integer", BASE + "sm_count: " + "9" * 5000 + "\n", r"unreadable value: Exceeds the limit \(4300 digits\)"),
]  # fmt: skip


@pytest.mark.parametrize("text,message", [c[1:] for c in HARDWARE], ids=[c[0] for c in HARDWARE])
def test_bad_hardware_yaml(cli, tmp_path, text, message):
    gpu = tmp_path / "my-gpu.yaml"
    gpu.write_text(text)
    before = cli.snapshot([gpu, *CONFIGS])
    r = cli.run(SIM, ["plan", "--model", "llama-7b", "--gpu", gpu, "--bits", "2"], cwd=tmp_path)
    cli.fails(r, r"^error: my-gpu\.yaml: " + message, before=before, code=2)


def test_non_utf8_hardware_yaml(cli, tmp_path):
    gpu = tmp_path / "my-gpu.yaml"
    gpu.write_bytes(b"base: h100-80g\ndescription: \xe9t\xe9\n")
    before = cli.snapshot([gpu, *CONFIGS])
    r = cli.run(SIM, ["plan", "--model", "llama-7b", "--gpu", gpu], cwd=tmp_path)
    cli.fails(r, r"^error: my-gpu\.yaml: not UTF-8 text \(byte 28\)$", before=before, code=2)


# --- model config.json (Hugging Face) and kvq model YAML: (id, file name, text, message regex) ---------------
LLAMA = {
    "hidden_size": 4096,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "num_hidden_layers": 32,
    "intermediate_size": 14336,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "rope_theta": 500000.0,
}


def _json(**changes) -> str:
    return json.dumps({k: v for k, v in {**LLAMA, **changes}.items() if v is not None})


MODELS = [
    ("config-json-5000-digit-integer", "config.json", '{"hidden_size": ' + "9" * 5000 + "}", r"unreadable value: Exceeds the limit \(4300 digits\)"),
    ("config-json-huge-integer", "config.json", _json(vocab_size=10**40), r"field 'vocab_size' must be an integer in 1..16,777,216, got a 133-bit integer"),
    ("config-json-missing-field", "config.json", _json(vocab_size=None), r"missing field 'vocab_size' \(an integer in 1..16,777,216\)$"),
    ("config-json-misspelt-field", "config.json", _json(num_hidden_layers=None, num_hiden_layers=32), r"unknown field 'num_hiden_layers'; did you mean 'num_hidden_layers'\?"),
    ("config-json-misspelt-optional", "config.json", _json(num_key_value_heads=None, num_key_value_head=8), r"unknown field 'num_key_value_head'; did you mean 'num_key_value_heads'"),
    ("config-json-string-number", "config.json", _json(hidden_size="4096"), r"field 'hidden_size' must be an integer in 1..16,777,216, got '4096'"),
    ("config-json-float", "config.json", _json(num_hidden_layers=32.0), r"field 'num_hidden_layers' must be an integer .* got 32.0"),
    ("config-json-nan", "config.json", _json(hidden_size=float("nan")), r"field 'hidden_size' must be an integer .* got nan"),
    ("config-json-zero-heads", "config.json", _json(num_attention_heads=0), r"field 'num_attention_heads' must be an integer in 1.."),
    ("config-json-bool-layers", "config.json", _json(num_hidden_layers=True), r"field 'num_hidden_layers' must be an integer .* got True"),
    ("config-json-heads-not-divisible", "config.json", _json(num_attention_heads=30), r"hidden_size 4096 is not divisible by num_attention_heads 30"),
    ("config-json-kv-heads-not-dividing", "config.json", _json(num_key_value_heads=5), r"num_attention_heads 32 is not a multiple of num_key_value_heads 5"),
    ("config-json-top-k-above-experts", "config.json", _json(num_local_experts=8, num_experts_per_tok=9), r"num_experts_per_tok 9 exceeds num_local_experts 8"),
    ("config-json-tie-not-bool", "config.json", _json(tie_word_embeddings="false"), r"field 'tie_word_embeddings' must be true or false, got 'false'"),
    ("config-json-max-positions-zero", "config.json", _json(max_position_embeddings=0), r"field 'max_position_embeddings' must be an integer in 1..17,179,869,184, got 0"),
    ("config-json-sliding-window-negative", "config.json", _json(sliding_window=-4096), r"field 'sliding_window' must be an integer in 1.., got -4096|field 'sliding_window' must be an integer in 1..16,777,216, got -4096"),
    ("config-json-array", "config.json", "[1, 2]", r"expected a JSON object of fields, got list"),
    ("config-json-truncated", "config.json", _json()[:40], r"line 1 column \d+: malformed JSON"),
    ("config-json-empty", "config.json", "", r"line 1 column 1: malformed JSON: Expecting value"),
    ("model-yaml-unknown-field", "m.yaml", "".join(f"{k}: {v}\n" for k, v in LLAMA.items()), r"unknown field 'rope_theta'; known fields: "),
    ("model-yaml-misspelt-field", "m.yaml", "hiden_size: 4096\n", r"unknown field 'hiden_size'; did you mean 'hidden_size'\?"),
    ("model-yaml-wrong-type", "m.yaml", "num_attention_heads: [32]\n", r"field 'num_attention_heads' must be an integer .* got \[32\]"),
    ("model-yaml-not-mapping", "m.yaml", "just text\n", r"expected a mapping of fields, got str"),
]  # fmt: skip


@pytest.mark.parametrize("name,text,message", [c[1:] for c in MODELS], ids=[c[0] for c in MODELS])
def test_bad_model_config(cli, tmp_path, name, text, message):
    cfg = tmp_path / "my-model" / name
    cfg.parent.mkdir()
    cfg.write_text(text)
    before = cli.snapshot([cfg, *CONFIGS])
    r = cli.run(SIM, ["plan", "--model", cfg, "--gpu", "h100-80g", "--bits", "2"], cwd=tmp_path)
    cli.fails(r, f"^error: my-model/{re.escape(name)}: " + message, before=before, code=2)


def test_list_gpus_with_a_bad_shipped_file(cli, tmp_path):
    """`kvq-sim list gpus` over a config directory holding one bad file names that file."""
    (tmp_path / "hardware").mkdir()
    (tmp_path / "hardware" / "broken.yaml").write_text("base: h100-80g\nl2_mb: 50\n")
    (tmp_path / "hardware" / "h100-80g.yaml").write_bytes((ROOT / "configs/hardware/h100-80g.yaml").read_bytes())
    before = cli.snapshot(sorted((tmp_path / "hardware").iterdir()))
    r = cli.run(SIM, ["list", "gpus"], cwd=tmp_path, env={"KVQ_CONFIG_DIR": str(tmp_path)})
    cli.fails(r, r"^error: .*broken\.yaml: unknown field 'l2_mb'; did you mean 'l2_mib'\?$", before=before, code=2)


# --- positive controls: the same harness sees good input succeed, and the answers corrected ----------


def _ok(cli, args, cwd):
    r = cli.run(SIM, args, cwd=cwd)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    return r


def test_good_plan_and_list_exit_0(cli, tmp_path):
    r = _ok(cli, ["plan", "--model", "llama-2-7b", "--gpu", "a100-80g", "--bits", "2", "--context", "4096"], tmp_path)
    assert "max batch at 4,096 tokens  ->  " in r.stdout and r.stderr == ""
    r = _ok(cli, ["list", "methods"], tmp_path)
    assert "h2o" in r.stdout and r.stderr == ""


def test_h2o_17_billion_on_8_gpus_is_capped_by_its_budget(cli, tmp_path):
    r = _ok(cli, ["plan", "--model", "llama-7b", "--gpu", "8x-h100", "--method", "h2o"], tmp_path)
    assert "max context at batch 1  ->  any context (h2o eviction caps the cache at 2,176 tokens)" in r.stdout
    assert "17,179,869,184" not in r.stdout and "2,141,087,232" not in r.stdout


def test_llama_3_8b_2752640_tokens_warns_beyond_max_position(cli, tmp_path):
    r = _ok(cli, ["plan", "--model", "llama-3-8b", "--gpu", "h100-80g", "--bits", "2"], tmp_path)
    assert "max context at batch 1  ->  2,752,640 tokens" in r.stdout
    assert r.stderr == (
        "warning: the max context 2,752,640 tokens is what memory holds; llama-3-8b was trained for at most "
        "8,192 tokens (max_position_embeddings)\n"
    )
    r = _ok(cli, ["plan", "--model", "llama-3-8b", "--gpu", "h100-80g", "--bits", "2", "--context", "9000"], tmp_path)
    assert "9,000 tokens per sequence exceed llama-3-8b's max_position_embeddings (8,192)" in r.stderr


def test_nominal_memory_gib_94_on_a_base_gpu_is_used(cli, tmp_path):
    gpu = tmp_path / "h100-nvl.yaml"
    gpu.write_text("base: h100-80g\nnominal_memory_gib: 94\n")
    r = _ok(cli, ["plan", "--model", "llama-7b", "--gpu", gpu, "--bits", "2"], tmp_path)
    assert "usable memory per GPU: 93.18 GiB" in r.stdout  # 79.18 GiB of the H100 + 14 GiB
    assert "efficiencies transferred from h100-80g (not measured on this GPU)" in r.stdout
