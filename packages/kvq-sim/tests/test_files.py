"""kvq-sim's output files: a replaced file keeps its previous bytes, and no existing file is ever overwritten,
a backup of the user's own included."""

from __future__ import annotations

import pytest

from kvq_sim.files import backup_path, latest_backup, next_backup, write_text


def test_a_replaced_file_keeps_its_bytes_in_the_first_free_backup_name(tmp_path):
    out = tmp_path / "fit.yaml"
    assert write_text(out, "one\n") is True
    assert latest_backup(out) is None and next_backup(out) == backup_path(out)
    assert write_text(out, "two\n") is True
    assert backup_path(out).read_text() == "one\n" and latest_backup(out) == backup_path(out)
    assert write_text(out, "two\n") is False  # unchanged: no new backup
    assert write_text(out, "three\n") is True
    assert (tmp_path / "fit.yaml.1.bak").read_text() == "two\n" and backup_path(out).read_text() == "one\n"
    assert latest_backup(out) == tmp_path / "fit.yaml.1.bak" and out.read_text() == "three\n"


def test_a_users_own_backup_named_file_is_never_overwritten(tmp_path):
    out, mine = tmp_path / "c.pdf", tmp_path / "c.pdf.bak"
    out.write_bytes(b"old report")
    mine.write_bytes(b"the user's notes")
    (tmp_path / "c.pdf.7.bak").write_bytes(b"an older one")
    (tmp_path / "c.pdf.x.bak").write_bytes(b"not a number: not a backup name")
    assert next_backup(out) == tmp_path / "c.pdf.8.bak"
    assert write_text(out, "new report") is True
    assert mine.read_bytes() == b"the user's notes"
    assert (tmp_path / "c.pdf.7.bak").read_bytes() == b"an older one"
    assert (tmp_path / "c.pdf.8.bak").read_bytes() == b"old report"
    assert latest_backup(out) == tmp_path / "c.pdf.8.bak"


def test_a_directory_in_the_backup_name_is_skipped_not_replaced(tmp_path):
    out = tmp_path / "r.json"
    out.write_text("old")
    (tmp_path / "r.json.bak").mkdir()
    write_text(out, "new")
    assert (tmp_path / "r.json.bak").is_dir() and (tmp_path / "r.json.1.bak").read_text() == "old"


@pytest.mark.parametrize("name", ["a.b", "x+y.pdf", "(1).yaml"])
def test_backup_names_match_the_file_name_literally(tmp_path, name):
    out = tmp_path / name
    out.write_text("1")
    (tmp_path / ("z" + name + ".bak")).write_text("someone else's")
    write_text(out, "2")
    assert backup_path(out).read_text() == "1" and latest_backup(out) == backup_path(out)
