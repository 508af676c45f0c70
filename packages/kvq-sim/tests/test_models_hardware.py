"""Model shapes against REFERENCES.md section 6, Hugging Face config.json reading, hardware validation."""

import json

import pytest

from kvq_sim.errors import SimInputError
from kvq_sim.hardware import hardware_names, load_hardware
from kvq_sim.models import load_model, model_names

# (params in billions, fp16 KV KiB per token) from REFERENCES.md section 6, rounded as printed there.
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
    assert load_model("mixtral-8x7b").active_params / 1e9 == pytest.approx(12.9, rel=0.005)  # REFERENCES 6


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
    assert node.gpus == 8 and node.usable_memory_bytes == gpu.usable_memory_bytes == 85_017_493_504  # REFERENCES 5
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
    f.write_text("name: my-gpu\nhbm_bandwidth_gb_s: 2000\n")
    r = CliRunner().invoke(main, ["plan", "--model", "llama-7b", "--gpu", str(f), "--bits", "2"])
    assert r.exit_code == 2
    assert "missing field" in r.output and "base: <gpu>" in r.output
    assert len(r.output.strip().splitlines()) == 1
