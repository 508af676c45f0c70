"""Where a measurement came from: date, commit, software versions and GPU, as the columns of a benchmark CSV row.

Imports nothing outside the standard library: torch, triton and transformers are read only when a field that
needs them is asked for, and only when they are installed, so the simulator's scripts can stamp their output
without loading torch.

    >>> prov = provenance(fields=CSV_FIELDS)  # doctest: +SKIP
    {'device': 'NVIDIA H100 80GB HBM3', 'driver': '580.159.04', 'torch': '2.11.0+cu130', 'triton': '3.6.0',
     'commit': 'f65f1c7', 'date': '2026-11-23T10:12:25Z'}
"""

from __future__ import annotations

import datetime
import importlib.metadata
import importlib.util
import os
import platform
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

#: every field `provenance` can fill, in the order it returns them
FIELDS = (
    "device", "gpu_count", "driver", "cuda", "nccl", "torch", "triton", "transformers", "python",
    "commit", "dirty", "date",
)  # fmt: skip
#: the provenance columns of the kernel, e2e, flush, replay and weight-GEMV CSVs (kvq_sim.measurements reads
#: device, commit and date)
CSV_FIELDS = ("device", "driver", "torch", "triton", "commit", "date")
#: the value of a field whose package, GPU or tool is absent
ABSENT = "n/a"
#: suffix of `commit` when the checkout has changes `git status --porcelain` lists (as kvq-eval's rows)
DIRTY = "+dirty"


def utc_now() -> str:
    """The current UTC time, ISO 8601 to the second: "2026-11-23T10:12:25Z"."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def commit_of(root: str | Path | None = None) -> tuple[str, bool | None]:
    """(short commit, whether the tree has changes) of the git checkout holding `root` (default: this module's).

    Outside a checkout (an archive of the tree copied to a GPU machine) the commit is the KVQ_COMMIT
    environment variable, else "unknown", and the dirty flag None (not known).
    """
    here = Path(root) if root is not None else Path(__file__).resolve().parent
    sha = _git(["rev-parse", "--short", "HEAD"], here)
    if not sha:
        return os.environ.get("KVQ_COMMIT") or "unknown", None
    status = _git(["status", "--porcelain"], here)
    return sha, status is None or status != ""


def _version(package: str) -> str:
    """The imported module's __version__ (torch's carries the CUDA tag: 2.11.0+cu130), else the installed
    distribution's version, else ABSENT; never imports the package."""
    module = sys.modules.get(package)
    if module is not None and hasattr(module, "__version__"):
        return str(module.__version__)
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return ABSENT


def _driver() -> str:
    """The NVIDIA driver version of the first GPU (nvidia-smi), or ABSENT without nvidia-smi."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return ABSENT
    lines = out.stdout.strip().splitlines()
    return lines[0].strip() if out.returncode == 0 and lines else ABSENT


def _cuda_fields() -> dict:
    """device, gpu_count, cuda, nccl from torch; "cpu", 0 and ABSENT without torch or without a CUDA GPU."""
    out = dict(device="cpu", gpu_count=0, cuda=ABSENT, nccl=ABSENT)
    if "torch" not in sys.modules and importlib.util.find_spec("torch") is None:
        return out
    import torch

    out["cuda"] = torch.version.cuda or ABSENT
    if not torch.cuda.is_available():
        return out
    out.update(device=torch.cuda.get_device_name(), gpu_count=torch.cuda.device_count())
    try:
        out["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    except (AttributeError, RuntimeError):  # a torch build without NCCL
        pass
    return out


def provenance(commit: str | None = None, fields: Iterable[str] = FIELDS) -> dict:
    """The provenance `fields` (of FIELDS, in the order given) of a run now, on this machine's current GPU.

    commit None: `commit_of` this checkout, with DIRTY appended when the tree has changes ("f65f1c7+dirty");
    `dirty` is True, False, or ABSENT where no checkout tells. A given `commit` is taken as it is (dirty ABSENT).
    Device fields import torch only when it is installed; `device` is torch.cuda.get_device_name() (the name
    kvq-sim matches a hardware file's torch_device_name against), "cpu" without a CUDA GPU.
    """
    fields = tuple(fields)
    unknown = [f for f in fields if f not in FIELDS]
    if unknown:
        raise ValueError(f"unknown provenance field(s) {', '.join(unknown)}; valid: {', '.join(FIELDS)}")
    values: dict = {}
    if {"device", "gpu_count", "cuda", "nccl"} & set(fields):
        values.update(_cuda_fields())
    if "driver" in fields:
        values["driver"] = _driver()
    for package in ("torch", "triton", "transformers"):
        if package in fields:
            values[package] = _version(package)
    values["python"] = platform.python_version()
    if {"commit", "dirty"} & set(fields):
        if commit is None:
            sha, dirty = commit_of()
            values["commit"] = sha + (DIRTY if dirty else "")
            values["dirty"] = ABSENT if dirty is None else dirty
        else:
            values["commit"], values["dirty"] = commit, ABSENT
    values["date"] = utc_now()
    return {f: values[f] for f in fields}
