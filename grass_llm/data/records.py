"""Types shared by the readers and the tokenizer: records, skip reports, the data error.

Every problem with the input is either raised as a ``DataError`` (policy ``on_error="error"``) or
recorded as a ``Skipped`` entry (policy ``on_error="skip"``), so no record is ever dropped
without a trace: ``len(records) + len(skipped)`` accounts for every record that was read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ON_ERROR_POLICIES = ("error", "skip")
IGNORE_INDEX = -100  # the label of a position that is not a target (Hugging Face's convention)

SKIP_HINT = ("Fix or remove the record, or pass on_error='skip' to skip such records "
             "(they are then listed in the result's `skipped`)")


class DataError(ValueError):
    """The input data cannot be used as given.

    Attributes:
        location: Where the problem is, e.g. ``"data.jsonl:12"`` or ``"data.parquet:row 5"``.
        reason: What is wrong, without the location.
        record_id: The id of the offending record when known, else None.
    """

    def __init__(self, location: str, reason: str, hint: str = "",
                 record_id: str | None = None):
        self.location = location
        self.reason = reason
        self.hint = hint
        self.record_id = record_id
        message = f"{location}: {reason}"
        if hint:
            message += f". {hint}"
        super().__init__(message)

    def __reduce__(self):
        # Rebuilt from its fields, not from ``args`` (the message): it crosses process
        # boundaries when the corpus is tokenized by a pool of workers.
        return type(self), (self.location, self.reason, self.hint, self.record_id)


class Invalid(Exception):
    """A record-level problem found while tokenizing; ``tokenize_records`` applies the
    ``on_error`` policy to it."""


@dataclass
class Record:
    """One raw record of a corpus.

    Attributes:
        id: The record's ``id`` field as a string when it has a non-null one, else its 0-based
            index in the file (counting every record position, valid or not, so ids do not shift
            when a bad record is skipped or fixed). For a directory of text files: the relative
            path.
        fields: The raw record (a JSON object, a Parquet/HF row, or ``{"text": ...}``).
        location: Where the record is: ``"data.jsonl:12"`` (1-based line),
            ``"data.parquet:row 5"`` (0-based row), ``"docs/a.txt"``, ``"corpus.txt:3"``.
    """

    id: str
    fields: dict[str, Any]
    location: str


@dataclass
class Skipped:
    """A record (or a window of one) left out under ``on_error="skip"``, and why.

    Attributes:
        id: The record's id when it could be determined, else None.
        location: Where the record is (same convention as ``Record.location``).
        reason: Why it was left out.
    """

    id: str | None
    location: str
    reason: str


def check_on_error(on_error: str) -> None:
    """Raises ValueError unless ``on_error`` is one of ``ON_ERROR_POLICIES``."""
    if on_error not in ON_ERROR_POLICIES:
        raise ValueError(f"on_error must be one of {ON_ERROR_POLICIES}, got {on_error!r}")


@dataclass
class Reporter:
    """Applies the ``on_error`` policy to record-level problems.

    Attributes:
        on_error: ``"error"`` raises a ``DataError`` at the first problem, ``"skip"`` collects it.
        skipped: The problems collected so far (only under ``"skip"``).
    """

    on_error: str
    skipped: list[Skipped] = field(default_factory=list)

    def __post_init__(self):
        check_on_error(self.on_error)

    def problem(self, location: str, reason: str, record_id: str | None = None) -> None:
        """Raises (policy "error") or records (policy "skip") one bad record."""
        if self.on_error == "error":
            raise DataError(location, reason, SKIP_HINT, record_id)
        self.skipped.append(Skipped(record_id, location, reason))


class RecordProblem(Exception):
    """A record-level problem found by ``record_id_of``: ``location``, ``reason``, ``record_id``."""

    def __init__(self, location: str, reason: str, record_id: str | None = None):
        super().__init__(location, reason, record_id)
        self.location, self.reason, self.record_id = location, reason, record_id


def record_id_of(index: int, value: Any, location: str, given: str | None = None) -> str:
    """The id of one parsed value, after checking that it can be a record.

    Args:
        index: The 0-based position of the record in its file; the id when it has none.
        value: The parsed value; must be a dict (a JSON object / table row).
        location: Where the value is.
        given: An id imposed by the reader (a file's relative path); else the value's ``id``
            field (a string or an integer) or, when it is missing or null, ``index``.

    Raises:
        RecordProblem: The value is not an object, or its ``id`` field has a wrong type.
    """
    if not isinstance(value, dict):
        raise RecordProblem(location, f"expected a JSON object, found {_json_type(value)}")
    if given is not None:
        return given
    raw = value.get("id")
    if raw is None:  # a null id (a table column with gaps) means "no id", like a missing one
        return str(index)
    # bool is an int subclass, but True/False as ids is almost surely a data bug.
    if isinstance(raw, str) or (isinstance(raw, int) and not isinstance(raw, bool)):
        return str(raw)
    raise RecordProblem(location, f"field 'id' must be a string or an integer, "
                                  f"found {_json_type(raw)}")


def duplicate_reason(rid: str, first_location: str) -> str:
    """The reason given for a record whose id an earlier record (at ``first_location``) has."""
    return f"duplicate id {rid!r} (first used at {first_location})"


class RecordCollector:
    """Builds the ``Record`` list of one file: checks each value, derives and de-duplicates ids.

    Args:
        on_error: The policy for bad records (see ``Reporter``).
    """

    def __init__(self, on_error: str):
        self.reporter = Reporter(on_error)
        self.records: list[Record] = []
        self._seen: dict[str, str] = {}  # id -> location of its first record

    def problem(self, location: str, reason: str, record_id: str | None = None) -> None:
        """Raises or records one bad record (see ``Reporter.problem``)."""
        self.reporter.problem(location, reason, record_id)

    def apply(self, event: tuple) -> None:
        """Applies one event of ``grass_llm.data.readers.parse_chunk``."""
        kind = event[0]
        if kind == "add":
            self.add(*event[1:])
        elif kind == "problem":
            self.problem(*event[1:])
        else:
            assert kind == "note", event
            self.reporter.skipped.append(event[1])

    def add(self, index: int, value: Any, location: str, record_id: str | None = None) -> None:
        """Adds one parsed value as a record, or reports why it cannot be one (see the
        ``record_id_of`` for the arguments)."""
        try:
            rid = record_id_of(index, value, location, record_id)
        except RecordProblem as problem:
            self.problem(problem.location, problem.reason, problem.record_id)
            return
        first = self._seen.get(rid)
        if first is not None:
            self.problem(location, duplicate_reason(rid, first), rid)
            return
        self._seen[rid] = location
        self.records.append(Record(rid, value, location))


def _json_type(value: Any) -> str:
    """The JSON name of a Python value's type, for messages."""
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
             int: "a number", float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)
