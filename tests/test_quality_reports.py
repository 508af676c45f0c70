"""The committed quality tables are reproducible: every row of a CSV in reports/quality was made from a clean tree, at a
commit whose kvq-core sources are HEAD's (`git diff --quiet <commit> HEAD -- packages/kvq-core/src`), or differ from
them only by commits listed in NO_NUMERIC_CHANGE with the reason they change no number.

Regenerate a table that fails with `make quality` (or its kvq-eval line) from a clean checkout of HEAD.
"""

import csv
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
QUALITY = ROOT / "reports" / "quality"
SOURCES = "packages/kvq-core/src"

#: tables made before kvq-eval recorded a clean-tree flag, with one decode window and no interval; not regenerated
#: yet (one window at a time, the 16-window 512-token table of every method was hours on a shared 2-core machine;
#: with batched windows `make quality` regenerates them: drop each entry once its table is regenerated)
LEGACY: dict[str, str] = {}
TABLES = sorted(p.name for p in QUALITY.glob("*.csv"))
#: commits that changed packages/kvq-core/src without changing anything kvq-eval computes, each with why: a row made
#: before one of them still reproduces at HEAD. Every other change of the sources since a row's commit fails.
NO_NUMERIC_CHANGE = {
    "2bf001fe0d6c0f09f5fa1068635fd0d653764e23": "KVQCache refuses calibration= without model= (kvq-eval passes model=)",
    "64941492704ba1f669c5627c661cfc1ff793b8e3": "adds the kvquant-w96 method; no existing method's format or computation changes",
    "bbe71332dd6ae978a8c71d007944acf7a38ab2a5": "adds kvq-eval --unweighted-calibration; the default fit and its calibration text are unchanged",
    **dict.fromkeys(
        (
            "ecf8f263b1e936a2186ea80ad98a944dd96251c7",
            "737f8cbf94fad7e12ebde645df861de85907d4a8",
            "cdee55eb6c21c8fad677dc3a5542ea92830274b5",
        ),
        "kvq_core.splits (the decode kernels' and kvq-sim's split-KV rule) only: nothing kvq-eval runs imports it",
    ),
    **dict.fromkeys(
        ("c48e80d607efe87c0b7c0155d2fff1c380584d0c", "0f23fbc9fe8cd7f2543efbe6a42b61406a349045"),
        "the 3-bit 1-bit plane's bit order: pack / unpack round-trip exactly and the byte counts are unchanged, so "
        "every dequantized value kvq-eval sees is the same",
    ),
    "783b3587a58c0123af7dacf0ffdb9e1edf0f1514": "pack / unpack of rows with no codes give 0 bytes again, as when the tables were made (c48e80d had made them raise)",
    "65e7e6af26afc81692b3c287d6a477ea5675ce4a": "load_smollm2 reads a float32 copy of the same conversion: equal tensors, tokens and logits "
    "(tests/test_smollm2_copy.py)",
    "aba7f9445b285a2b8bc1fcfc3fe7252ba341ec72": "kvq-eval's usage errors only (a cache spec with no method, the "
    "--calibration-text flag named in its error): argument parsing, before any text, model or cache is touched",
}


def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)


@pytest.fixture(scope="module")
def checkout():
    if _git("rev-parse", "HEAD").returncode != 0:
        pytest.skip("not a git checkout: the commits of the rows cannot be compared")


def test_legacy_tables_exist():
    assert set(LEGACY) <= set(TABLES), "a legacy table was regenerated or removed: drop it from LEGACY"


@pytest.mark.parametrize("name", [t for t in TABLES if t not in LEGACY])
def test_rows_come_from_a_clean_tree_with_heads_sources(name, checkout):
    with (QUALITY / name).open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows, f"{name} holds no rows"
    assert {"commit", "dirty"} <= set(rows[0]), f"{name}: no commit or dirty column; regenerate it or list it as legacy"
    for i, r in enumerate(rows, start=2):
        where = f"{name}, row {i} ({r.get('cache')})"
        assert r["dirty"] == "False" and not r["commit"].endswith("+dirty"), f"{where}: made from a dirty tree"
        commit = r["commit"]
        assert _git("cat-file", "-e", f"{commit}^{{commit}}").returncode == 0, f"{where}: unknown commit {commit}"
        if _git("diff", "--quiet", commit, "HEAD", "--", SOURCES).returncode == 0:
            continue
        since = _git("log", "--format=%H", f"{commit}..HEAD", "--", SOURCES).stdout.split()
        changed = [c[:9] for c in since if c not in NO_NUMERIC_CHANGE]
        assert since and not changed, (
            f"{where}: made at {commit}, whose {SOURCES} differs from HEAD's (commits {', '.join(changed)}); regenerate it"
        )
