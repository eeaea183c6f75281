"""The writer of ``walk`` output to a file or stdout: the rows of :mod:`diskover_agent.schema`,
as NDJSON or CSV."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from typing import IO, Optional

from .. import schema
from ..protocol import Entry
from ..schema import COLUMNS as FIELDS
from ..schema import TYPES, Row
from ..schema import entry_rows as records

__all__ = ["FIELDS", "TYPES", "Record", "RecordWriter", "records"]

#: One record of ``walk`` output (the schema's row).
Record = Row


class RecordWriter:
    """Walk records to a binary stream, as NDJSON or CSV (a header row, then one row per
    record: null is an empty field, bytes are base64). It holds nothing back: what it was
    given is in the stream (the stream's own buffer aside), so a stream that fails leaves
    nothing here to flush again."""

    def __init__(self, out: IO[bytes], fmt: str) -> None:
        self.out = out
        self.fmt = fmt
        self._csv_text: Optional[io.StringIO] = None
        if fmt == "csv":
            self._csv_text = io.StringIO(newline="")
            self._csv = csv.writer(self._csv_text, lineterminator="\n")
            self._csv.writerow(FIELDS)
            self._write_csv()

    def add_dir(self, path: bytes, entries: Sequence[Entry]) -> None:
        """Write the records of a directory's entries."""
        self.write(schema.entry_rows(path, entries))

    def add_error(self, path: bytes, error: OSError) -> None:
        """Write the record of a directory that could not be listed (the walk also names it on stderr)."""
        self.write([schema.error_row(path, error)])

    def write(self, rows: list[Row]) -> None:
        if not rows:
            return
        if self._csv_text is not None:
            self._csv.writerows(map(schema.csv_values, rows))
            self._write_csv()
        else:
            self.out.write(schema.ndjson(rows))

    def _write_csv(self) -> None:
        """The CSV rows written so far, as UTF-8, to the stream."""
        assert self._csv_text is not None
        text = self._csv_text.getvalue()
        self._csv_text.seek(0)
        self._csv_text.truncate()
        self.out.write(text.encode("utf-8"))

    def flush(self) -> None:
        self.out.flush()
