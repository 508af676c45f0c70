"""Bad-input corpus harness: run a CLI in a fresh interpreter and check that it fails cleanly.

A clean failure is: a non-zero exit code, no traceback on either stream, exactly one non-empty line on stderr
that matches the expected message, and no protected file changed (bytes compared before and after). The CLI runs
in a subprocess because click's CliRunner catches exceptions, so a traceback would never reach its output.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import pytest

CLI_TIMEOUT_S = 300  # a cold torch + transformers import on a loaded 2-core runner has taken over 30 s


@dataclasses.dataclass(frozen=True)
class CliResult:
    returncode: int
    stdout: str
    stderr: str

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]


def snapshot(paths: Iterable[Path]) -> dict[Path, bytes | None]:
    """Each path's bytes (None where it does not exist), to prove afterwards that nothing was written."""
    return {Path(p): (Path(p).read_bytes() if Path(p).is_file() else None) for p in paths}


def run_cli(module: str, args: Sequence[str], cwd: Path | None = None, env: dict | None = None) -> CliResult:
    """`python -m module args...` in a fresh interpreter with this interpreter's environment plus `env`."""
    full_env = {**os.environ, **(env or {})}
    r = subprocess.run(
        [sys.executable, "-m", module, *map(str, args)],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
        check=False,
    )
    return CliResult(r.returncode, r.stdout, r.stderr)


def assert_clean_failure(
    r: CliResult, match: str, before: dict[Path, bytes | None] | None = None, code: int | None = None
) -> None:
    """The run failed with one stderr line matching `match` (a regex), no traceback, and no file in `before` changed."""
    both = r.stdout + r.stderr
    assert "Traceback" not in both, f"traceback:\n{both[-3000:]}"
    assert r.returncode != 0, f"exit 0 on bad input; stdout: {r.stdout[-500:]!r}"
    if code is not None:
        assert r.returncode == code, f"exit {r.returncode}, expected {code}: {r.stderr[-500:]!r}"
    assert len(r.error_lines) == 1, f"expected one stderr line, got {len(r.error_lines)}: {r.stderr[-1500:]!r}"
    assert re.search(match, r.error_lines[0]), f"{r.error_lines[0]!r} does not match {match!r}"
    for path, old in (before or {}).items():
        now = path.read_bytes() if path.is_file() else None
        assert now == old, f"{path} changed"


@pytest.fixture
def cli():
    """The harness as a fixture: cli.run(...), cli.fails(...), cli.snapshot(...)."""

    class _Cli:
        run = staticmethod(run_cli)
        fails = staticmethod(assert_clean_failure)
        snapshot = staticmethod(snapshot)

    return _Cli()
