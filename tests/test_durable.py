"""Durable writes (cxr.core.durable): files replaced atomically with their mode, append-only CSV and line logs that
cut what an interrupted run tore."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from cxr.core.durable import AppendOnlyCsv, AppendOnlyLines, write_durably

# --- found by the mutation check (scripts/mutation.py, docs/tests/mutation.md): each test pins a decision, a
# bound or a message that a mutant changed without any other test noticing ------------------------------------


# guards cxr.core.durable: write_durably: the file mode asked for, else the umask's
def test_write_durably_sets_the_mode_asked_else_the_umask_default(tmp_path: Path) -> None:
    import os

    umask = os.umask(0o022)
    try:
        write_durably(tmp_path / "secret", b"k", mode=0o600)
        write_durably(tmp_path / "plain", b"p")
    finally:
        os.umask(umask)
    assert (tmp_path / "secret").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "plain").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "secret").read_bytes() == b"k" and not list(tmp_path.glob(".*.tmp"))


# guards cxr.core.durable: AppendOnlyCsv: one header, rows in column order
def test_a_new_csv_gets_its_header_once_and_rows_in_its_column_order(tmp_path: Path) -> None:
    path = tmp_path / "new.csv"
    log = AppendOnlyCsv(path, ("a", "b"))
    log.append([{"a": "1", "b": "x,y", "extra": "dropped"}])
    log.close()
    assert path.read_bytes() == b'a,b\n1,"x,y"\n'
    again = AppendOnlyCsv(path, ("a", "b"))
    again.append([{"b": "2", "a": "ä"}])
    again.close()
    assert again.rows == [{"a": "1", "b": "x,y"}]
    assert path.read_bytes() == 'a,b\n1,"x,y"\nä,2\n'.encode()


# guards cxr.core.durable: AppendOnlyCsv: an empty file is not a torn one
def test_an_empty_csv_gets_its_header_without_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "empty.csv"
    path.write_bytes(b"")
    with caplog.at_level(logging.WARNING):
        AppendOnlyCsv(path, ("a", "b")).close()
    assert path.read_bytes() == b"a,b\n" and not caplog.records


# guards cxr.core.durable: AppendOnlyCsv: an existing column order is kept
def test_a_csv_with_the_same_columns_in_another_order_keeps_its_order(tmp_path: Path) -> None:
    path = tmp_path / "old.csv"
    path.write_bytes(b"b,a\n1,2\n")
    log = AppendOnlyCsv(path, ("a", "b"))
    log.append([{"a": "3", "b": "4"}])
    log.close()
    assert log.columns == ("b", "a") and path.read_bytes() == b"b,a\n1,2\n4,3\n"


# guards cxr.core.durable: AppendOnlyCsv: a file with other columns is rewritten
def test_a_csv_with_other_columns_is_rewritten_dropping_the_columns_gone(tmp_path: Path) -> None:
    path = tmp_path / "old.csv"
    path.write_bytes(b"a,legacy\n1,x\n")
    AppendOnlyCsv(path, ("a", "b")).close()
    assert path.read_bytes() == b"a,b\n1,\n"


# guards cxr.core.durable: AppendOnlyCsv: a torn last row is cut on disk, with its warning
def test_a_torn_last_csv_row_is_dropped_on_disk_and_said(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "torn.csv"
    path.write_bytes(b"a,b\n1,2\n3,4\n5,")
    with caplog.at_level(logging.WARNING, logger="cxr.core.durable"):
        log = AppendOnlyCsv(path, ("a", "b"))
    log.close()
    assert log.rows == [{"a": "1", "b": "2"}, {"a": "3", "b": "4"}]
    assert path.read_bytes() == b"a,b\n1,2\n3,4\n"
    assert [r.getMessage() for r in caplog.records] == [
        f"{path}: dropping a partial last row left by an interrupted run"]


# guards cxr.core.durable: AppendOnlyLines.append: no line breaks inside a line
def test_lines_append_refuses_a_line_break_and_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    lines = AppendOnlyLines(path)
    lines.append("one")
    for bad in ("two\nthree", "two\rthree"):
        with pytest.raises(ValueError, match="^a line must not contain a line break$"):
            lines.append(bad)
    lines.close()
    assert path.read_bytes() == b"one\n"


# guards cxr.core.durable: AppendOnlyLines: the backwards search for the last line
def test_the_last_line_is_found_across_read_blocks(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The last newline is searched backwards in 64 KiB blocks: a last line longer than a block, a newline at the
    very start of the file, and a file whose only line is torn."""
    path = tmp_path / "long.jsonl"
    long = "x" * 70_000
    path.write_bytes(f"first\n{long}\n".encode())
    lines = AppendOnlyLines(path)
    assert lines.last == long
    lines.close()
    path.write_bytes(b"\n" + b"y" * 70_000 + b"\n")
    assert AppendOnlyLines(path).last == "y" * 70_000
    path.write_bytes(b"\n" + b"z" * 5)  # torn after an empty first line
    with caplog.at_level(logging.WARNING, logger="cxr.core.durable"):
        cut = AppendOnlyLines(path)
    assert path.read_bytes() == b"\n" and cut.last == ""
    assert [r.getMessage() for r in caplog.records] == [
        f"{path}: cutting a partial last line left by an interrupted run"]
    path.write_bytes(b"w" * 70_000)  # one torn line, no newline at all: cut to nothing
    assert AppendOnlyLines(path).last is None and path.read_bytes() == b""


# guards cxr.core.durable: AppendOnlyLines: a new file's mode 0640
def test_a_new_audit_file_is_private_to_the_service_group(tmp_path: Path) -> None:
    import os

    umask = os.umask(0o022)
    try:
        AppendOnlyLines(tmp_path / "trail.jsonl").close()
    finally:
        os.umask(umask)
    assert (tmp_path / "trail.jsonl").stat().st_mode & 0o777 == 0o640

