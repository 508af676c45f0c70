"""Model shapes against docs/references.md §6, Hugging Face config.json reading, hardware validation."""

import json

import pytest

from kvq_sim.errors import SimInputError
from kvq_sim.hardware import hardware_names, load_hardware
from kvq_sim.models import load_model, model_names

# (params in billions, fp16 KV KiB per token) from docs/references.md §6, rounded as printed there.
REFERENCE = {
    "llama-7b": (6.74, 512),
    "llama-2-7b": (6.74, 512),
    "llama-2-13b": (13.0, 800),
    "llama-2-70b": (69.0, 320),
    "llama-3-8b": (8.03, 128),
    "mistral-7b": (7.24, 128),
    "mixtral-8x7b": (46.7, 128),
    "smollm2-135m": (0.135, 22.5),
}


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_params_and_kv_per_token_match_references(name):
    m = load_model(name)
    params_b, kv_kib = REFERENCE[name]
    assert m.params / 1e9 == pytest.approx(params_b, rel=0.005)  # the table rounds to 3 significant digits
    assert m.num_hidden_layers * 2 * m.kv_size * 2 == kv_kib * 1024  # K and V, fp16, all layers


def test_mixtral_active_params():
    assert load_model("mixtral-8x7b").active_params / 1e9 == pytest.approx(12.9, rel=0.005)  # docs/references.md §6


def test_every_config_loads():
    assert len(model_names()) >= 9 and len(hardware_names()) >= 8
    for n in model_names():
        load_model(n)
    for n in hardware_names():
        load_hardware(n)


def test_hf_config_json(tmp_path):
    cfg = {
        "hidden_size": 4096,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "num_hidden_layers": 32,
        "intermediate_size": 14336,
        "vocab_size": 32000,
        "sliding_window": None,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "tie_word_embeddings": False,
    }
    d = tmp_path / "mixtral"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    m = load_model(str(d / "config.json"))
    assert m.name == "mixtral" and m.head_dim == 128 and m.num_local_experts == 8
    assert m.params == load_model("mixtral-8x7b").params
    cfg.update(num_local_experts=1, num_experts_per_tok=1, sliding_window=4096)
    (d / "config.json").write_text(json.dumps(cfg))
    assert load_model(str(d / "config.json")).params == load_model("mistral-7b").params
    assert load_model(str(d / "config.json")).sliding_window == 4096


def test_tied_embeddings_count_once():
    m = load_model("smollm2-135m")
    assert m.tie_word_embeddings and m.embedding_params == m.vocab_size * m.hidden_size + m.hidden_size


def test_node_inherits_gpu_fields():
    node, gpu = load_hardware("8x-h100"), load_hardware("h100-80g")
    # usable memory: docs/references.md §5
    assert node.gpus == 8 and node.usable_memory_bytes == gpu.usable_memory_bytes == 85_017_493_504
    assert node.hbm_bandwidth_gb_s == 3350 and node.interconnect == "nvlink"
    assert load_hardware("4x-l40s").interconnect == "pcie"


def test_hardware_validation_names_file_and_field(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("base: h100-80g\nhbm_bandwidth_gb_s: fast\n")
    with pytest.raises(SimInputError, match=r"x\.yaml: field 'hbm_bandwidth_gb_s' must be a positive number.*'fast'"):
        load_hardware(str(p))
    p.write_text("gpus: [1\n")
    with pytest.raises(SimInputError, match=r"x\.yaml: line \d+ malformed YAML"):
        load_hardware(str(p))
    with pytest.raises(SimInputError, match="unknown GPU 'b200'; valid: .*a100-80g"):
        load_hardware("b200")


def test_own_gpu_file_missing_a_field_suggests_a_base(tmp_path):
    from click.testing import CliRunner

    from kvq_sim.cli import main

    f = tmp_path / "my-gpu.yaml"
    f.write_text("description: my gpu\nhbm_bandwidth_gb_s: 2000\n")
    r = CliRunner().invoke(main, ["plan", "--model", "llama-7b", "--gpu", str(f), "--bits", "2"])
    assert r.exit_code == 2
    assert "missing field" in r.output and "base: <gpu>" in r.output
    assert len(r.output.strip().splitlines()) == 1


def _gpu_file(tmp_path, text, name="mine.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_misspelt_hardware_field_names_the_closest_one(tmp_path):
    p = _gpu_file(tmp_path, "base: h100-80g\nhbm_bandwith_gb_s: 3900\n")
    with pytest.raises(
        SimInputError, match=r"mine\.yaml: unknown field 'hbm_bandwith_gb_s'; did you mean 'hbm_bandwidth_gb_s'\?"
    ):
        load_hardware(p)
    p = _gpu_file(tmp_path, "base: h100-80g\ncalibration:\n  tensor_core_eficiency: 0.5\n")
    with pytest.raises(
        SimInputError, match=r"'calibration.tensor_core_eficiency'; did you mean 'tensor_core_efficiency'"
    ):
        load_hardware(p)


@pytest.mark.parametrize(
    "line,message",
    [
        (
            "hbm_bandwidth_gb_s: 1.0e-300",
            "'hbm_bandwidth_gb_s' must be a positive number from 10 up to 100000, got 1e-300",
        ),
        ("hbm_bandwidth_gb_s: .nan", "'hbm_bandwidth_gb_s' must be .* got nan"),
        ("fp16_dense_tflops: .inf", "'fp16_dense_tflops' must be .* got inf"),
        ("sm_count: 132.5", "'sm_count' must be a positive integer"),
        ("gpus: true", "'gpus' must be a positive integer .* got True"),
        ("hbm_bandwidth_gb_s: 1e3", r"got '1e3' \(text, not a number"),
        (
            "usable_memory_bytes: 99999999999",
            r"usable_memory_bytes \(93.13 GiB\) exceeds nominal_memory_gib \(80 GiB\)",
        ),
        (
            "calibration: {interconnect_efficiency: 0}",
            "'calibration.interconnect_efficiency' must be a positive number",
        ),
        ("calibration: {kernel_launch_overhead_us: -1}", "'calibration.kernel_launch_overhead_us' must be a number"),
        ("calibration: [1, 2]", "field 'calibration' must be a mapping of fields, got list"),
        ("description: {a: 1}", "field 'description' must be a single value, got a dict"),
    ],
)
def test_hardware_values_out_of_physical_range_are_refused(tmp_path, line, message):
    with pytest.raises(SimInputError, match=message):
        load_hardware(_gpu_file(tmp_path, f"base: h100-80g\n{line}\n"))


def test_changed_memory_recomputes_usable_memory_and_uncalibrates(tmp_path):
    h100 = load_hardware("h100-80g")
    nvl = load_hardware(_gpu_file(tmp_path, "base: h100-80g\nnominal_memory_gib: 94\n"))
    assert h100.calibration.status == "calibrated"
    assert nvl.usable_memory_bytes == 85_017_493_504 + 14 * (1 << 30)  # the H100's measured gap kept
    assert nvl.calibration.status == "transferred from h100-80g" and nvl.torch_device_name is None
    assert nvl.calibration.attention_kernels == h100.calibration.attention_kernels  # same SMs and clock: x 1
    node = load_hardware(_gpu_file(tmp_path, "base: mine\ngpus: 2\n", "node.yaml"))
    assert node.gpus == 2 and node.usable_memory_bytes == nvl.usable_memory_bytes
    assert node.calibration.status == "transferred from h100-80g"
    assert load_hardware("8x-h100").calibration.status == "calibrated"  # a node of unchanged GPUs


def test_changed_sm_count_retransfers_from_the_measured_gpu(tmp_path):
    h200 = load_hardware("h200")
    half = load_hardware(_gpu_file(tmp_path, "base: h200\nsm_count: 66\n"))
    assert h200.calibration.status == "calibrated"  # the H200 is fitted on its own measurements
    assert half.calibration.status == "transferred from h200"
    for a, b in zip(h200.calibration.attention_kernels, half.calibration.attention_kernels):
        assert b.unpack_ps_per_kv_element == pytest.approx(2 * a.unpack_ps_per_kv_element, rel=1e-12)  # 132 / 66
        assert b.overhead_us == a.overhead_us


def test_same_value_as_the_base_keeps_its_calibration(tmp_path):
    same = load_hardware(_gpu_file(tmp_path, "base: h100-80g\nhbm_bandwidth_gb_s: 3350\ndescription: mine\n"))
    assert same.calibration.status == "calibrated" and same.torch_device_name == "NVIDIA H100 80GB HBM3"


@pytest.mark.parametrize(
    "text,message",
    [
        ("a: 1\na: 2\n", r"line 2: field 'a' given twice"),
        ("", "empty file"),
        ("gpus: " + "9" * 5000 + "\n", "unreadable value: Exceeds the limit"),
        ("base: mine\n", "field 'base' forms a cycle"),
        ("base: 7\n", "field 'base' must be a GPU name, got 7"),
    ],
)
def test_unreadable_hardware_files(tmp_path, text, message):
    with pytest.raises(SimInputError, match=message):
        load_hardware(_gpu_file(tmp_path, text))


def test_non_utf8_config(tmp_path):
    p = tmp_path / "bin.yaml"
    p.write_bytes(b"description: \xff\xfe\n")
    with pytest.raises(SimInputError, match=r"bin\.yaml: not UTF-8 text \(byte 13\)"):
        load_hardware(str(p))


LLAMA = {
    "hidden_size": 4096,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "intermediate_size": 11008,
    "vocab_size": 32000,
    "max_position_embeddings": 2048,
    "rope_theta": 10000.0,  # a field kvq-sim does not read: ignored in a config.json
}


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"num_hidden_layers": "32"}, "field 'num_hidden_layers' must be an integer in 1..16,777,216, got '32'"),
        ({"hidden_size": 4096.0}, "field 'hidden_size' must be an integer"),
        ({"vocab_size": -1}, "field 'vocab_size' must be an integer in 1..16,777,216, got -1"),
        ({"intermediate_size": 1 << 100}, "field 'intermediate_size' must be .* got a 101-bit integer"),
        ({"max_position_embeddings": 0}, "field 'max_position_embeddings' must be an integer in 1..17,179,869,184"),
        (
            {"num_hiden_layers": 32, "num_hidden_layers": None},
            "unknown field 'num_hiden_layers'; did you mean 'num_hidden_layers'",
        ),
        ({"slidng_window": 4096}, "unknown field 'slidng_window'; did you mean 'sliding_window'"),
        ({"tie_word_embeddings": "yes"}, "field 'tie_word_embeddings' must be true or false"),
        ({"name": 5}, "field 'name' must be a string"),
    ],
)
def test_bad_config_json_fields(tmp_path, changes, message):
    cfg = {k: v for k, v in {**LLAMA, **changes}.items() if v is not None}
    p = tmp_path / "config.json"
    p.write_text(json.dumps(cfg))
    with pytest.raises(SimInputError, match=message):
        load_model(str(p))


def test_config_json_unreadable_values(tmp_path):
    p = tmp_path / "config.json"
    p.write_text('{"hidden_size": ' + "9" * 5000 + "}")
    with pytest.raises(SimInputError, match=r"config\.json: unreadable value: Exceeds the limit \(4300 digits\)"):
        load_model(str(p))
    p.write_text('{"hidden_size": 4096,\n "vocab_size": }')
    with pytest.raises(SimInputError, match=r"config\.json: line 2 column 16: malformed JSON"):
        load_model(str(p))
    p.write_text(json.dumps({**LLAMA, "hidden_size": float("nan")}))
    with pytest.raises(SimInputError, match="field 'hidden_size' must be an integer .* got nan"):
        load_model(str(p))


def test_model_yaml_is_strict_and_reads_max_positions(tmp_path):
    assert load_model("llama-3-8b").max_position_embeddings == 8192
    p = tmp_path / "m.yaml"
    p.write_text("".join(f"{k}: {v}\n" for k, v in LLAMA.items() if k != "rope_theta") + "rope_theta: 10000.0\n")
    with pytest.raises(SimInputError, match=r"m\.yaml: unknown field 'rope_theta'; known fields: "):
        load_model(str(p))
