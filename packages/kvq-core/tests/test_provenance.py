"""kvq_core.provenance: commit and dirty flag from git (KVQ_COMMIT outside a checkout), fields by name, no torch."""

import re
import shutil
import subprocess
import sys

import pytest

from kvq_core.provenance import ABSENT, CSV_FIELDS, FIELDS, commit_of, provenance

needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git not installed")


def _git(cwd, *args):
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, check=True, capture_output=True
    )


@pytest.fixture
def outside_git(tmp_path, monkeypatch):
    """tmp_path, with git told not to look above it for a repository."""
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    return tmp_path


@needs_git
def test_commit_of_a_checkout_is_its_short_sha_and_dirty_once_a_file_changes(outside_git):
    (outside_git / "a.txt").write_text("1\n")
    _git(outside_git, "init", "-q")
    _git(outside_git, "add", "a.txt")
    _git(outside_git, "commit", "-q", "-m", "one")
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=outside_git, capture_output=True, text=True)
    assert commit_of(outside_git) == (sha.stdout.strip(), False)
    (outside_git / "a.txt").write_text("2\n")
    assert commit_of(outside_git) == (sha.stdout.strip(), True)


def test_outside_a_checkout_the_commit_is_kvq_commit_and_dirty_is_unknown(outside_git, monkeypatch):
    monkeypatch.setenv("KVQ_COMMIT", "f65f1c7")
    assert commit_of(outside_git) == ("f65f1c7", None)
    monkeypatch.delenv("KVQ_COMMIT")
    assert commit_of(outside_git) == ("unknown", None)


def test_fields_come_in_the_order_asked_and_a_given_commit_is_kept():
    prov = provenance("abc1234", fields=("date", "commit", "python", "dirty"))
    assert list(prov) == ["date", "commit", "python", "dirty"]
    assert prov["commit"] == "abc1234" and prov["dirty"] == ABSENT
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", prov["date"])
    assert prov["python"] == ".".join(map(str, sys.version_info[:3]))
    assert list(provenance(fields=CSV_FIELDS)) == ["device", "driver", "torch", "triton", "commit", "date"]
    assert list(provenance()) == list(FIELDS)


def test_an_unknown_field_is_an_error_listing_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown provenance field\(s\) cpu; valid: device, gpu_count"):
        provenance(fields=("cpu",))


def test_versions_and_commit_need_no_torch_import():
    """Package versions come from the installed metadata: the simulator's scripts stay torch-free."""
    code = (
        "import sys; from kvq_core.provenance import provenance; "
        "p = provenance(fields=('torch', 'transformers', 'commit', 'dirty', 'date')); "
        "print('torch' in sys.modules, 'transformers' in sys.modules, sorted(p) == sorted(set(p)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False", "True"]
