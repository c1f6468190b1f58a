"""Preference data: reading (load), interpreting (formats), tokenizing and collating into batches."""

from preftune.data.formats import DropLog, PairRecord, UnpairedRecord, normalize
from preftune.data.load import DataError, RawRow, read_rows

__all__ = ["DataError", "DropLog", "PairRecord", "RawRow", "UnpairedRecord", "normalize", "read_rows"]
