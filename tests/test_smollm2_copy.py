"""`load_smollm2`'s float32 copy of the GGUF conversion: the same tensors, tokens and logits as the conversion, read
back instead of converting again, and a damaged copy replaced rather than used."""

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from kvq_core import models  # noqa: E402


@pytest.fixture(scope="module")
def copy_dir(smollm2, tmp_path_factory):
    model, tok = smollm2
    folder = tmp_path_factory.mktemp("kvq-cache") / "smollm2-copy"
    models.write_fp32_copy(model, tok, folder)
    return folder


def test_the_copy_is_the_conversion_bit_for_bit(smollm2, copy_dir):
    model, tok = smollm2
    again, tok2 = models.read_fp32_copy(copy_dir)
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert again.lm_head.weight.data_ptr() == again.model.embed_tokens.weight.data_ptr()  # still tied
    text = models.pydoc_text("evaluation")[:4000]
    ids = tok(text).input_ids
    assert tok2(text).input_ids == ids
    x = torch.tensor([ids[:96]])
    with torch.no_grad():
        assert torch.equal(model(x).logits, again(x).logits)
    assert not again.training


def test_load_reads_an_existing_copy_and_replaces_a_damaged_one(smollm2, copy_dir, monkeypatch, capsys):
    gguf = models.find_smollm2_gguf()
    monkeypatch.setenv(models.CACHE_ENV, str(copy_dir.parent))
    folder = models.smollm2_copy_dir(gguf)
    assert folder.parent == copy_dir.parent
    copy_dir.rename(folder)

    def no_conversion(*a, **k):
        raise AssertionError("converted the GGUF file although a copy was there")

    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", no_conversion)
    model, _ = models.load_smollm2()
    assert torch.equal(model.model.embed_tokens.weight, smollm2[0].model.embed_tokens.weight)
    # a truncated file is not used: the load converts again (here: refused) after saying so
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(AssertionError, match="converted the GGUF file"):
        models.load_smollm2()
    assert "replacing the float32 copy" in capsys.readouterr().err
    assert not folder.exists()


def test_an_empty_cache_setting_keeps_no_copy(monkeypatch):
    monkeypatch.setenv(models.CACHE_ENV, "")
    assert models.smollm2_copy_dir(Path(models.__file__)) is None
