"""``--where``: which rows of an output ``export`` and the training loader take, by their numeric columns.

A small language, parsed here into a ``pyarrow.compute`` expression (never ``eval``)::

    silence_share < 0.5 and bandwidth_hz > 6000
    not (clipping_share > 0.001 or peak_dbfs >= 0) and duration_s >= 2
    loudness_lufs is not null

Comparisons (``<  <=  >  >=  ==  =  !=``) between a numeric column and a number (or two columns), combined with
``and``, ``or``, ``not`` (that precedence) and parentheses; ``COLUMN is null`` / ``is not null``. Keywords are
case-insensitive. Any numeric column of the output may be named: the signal columns (``loudness_lufs``,
``peak_dbfs``, ``clipping_share``, ``silence_share``, ``bandwidth_hz``, ``speech_share``), ``duration_s``,
``n_frames``, ``orig_sample_rate``, ``orig_channels`` and numeric metadata columns. A null value (e.g. the loudness
of digital silence) fails every comparison, negated or not: only ``is null`` selects it. A syntax error or an
unknown column is a :class:`WhereError` with a one-line message.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from pipeline.config import ConfigError

_TOKEN = re.compile(r"\s*(?:(?P<number>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)|(?P<name>[A-Za-z_]\w*)"
                    r"|(?P<op><=|>=|==|!=|<|>|=)|(?P<paren>[()]))")
_COMPARE = {"<": pc.less, "<=": pc.less_equal, ">": pc.greater, ">=": pc.greater_equal, "==": pc.equal,
            "=": pc.equal, "!=": pc.not_equal}
_KEYWORDS = {"and", "or", "not", "is", "null"}


class WhereError(ConfigError):
    """A ``--where`` expression that cannot be used: bad syntax, an unknown or non-numeric column."""


@dataclass(frozen=True)
class RowFilter:
    """A parsed ``--where``: its text, its expression and the columns it reads."""

    text: str
    expression: pc.Expression
    columns: tuple[str, ...]

    def check(self, schema: pa.Schema, where: str) -> None:
        """Raise :class:`WhereError` unless every column it names is a numeric column of ``schema`` (``where``:
        the data's name, for the message)."""
        numeric = [f.name for f in schema if pa.types.is_integer(f.type) or pa.types.is_floating(f.type)]
        for name in self.columns:
            if name not in numeric:
                what = "is not a numeric column" if name in schema.names else "is not a column"
                raise WhereError(f"--where {self.text!r}: {name!r} {what} of {where} (numeric columns: "
                                 f"{', '.join(numeric)})")

    def mask(self, table: pa.Table) -> np.ndarray:
        """The rows of ``table`` (holding :attr:`columns`) it selects, as a boolean array (null: not selected)."""
        values = ds.dataset(table).to_table(columns={"selected": self.expression}).column("selected")
        return values.combine_chunks().fill_null(False).to_numpy(zero_copy_only=False).astype(bool)


def parse_where(text: str) -> RowFilter:
    """Parse ``text`` (see the module docstring); :class:`WhereError` on a syntax error."""
    tokens = _tokenize(text)
    parser = _Parser(text, tokens)
    expression = parser.disjunction()
    if parser.i < len(tokens):
        parser.fail(f"unexpected {tokens[parser.i][1]!r}")
    if not parser.columns:
        raise WhereError(f"--where {text!r}: names no column")
    return RowFilter(text, expression, tuple(dict.fromkeys(parser.columns)))


def _tokenize(text: str) -> list[tuple[str, str, int]]:
    """(kind, text, position) of each token: number, name, keyword, op, paren."""
    tokens, pos = [], 0
    while pos < len(text.rstrip()):
        match = _TOKEN.match(text, pos)
        if match is None:
            raise WhereError(f"--where {text!r}: cannot read {text[pos:].strip()[:20]!r} (at character {pos + 1})")
        kind = match.lastgroup
        value, start = match.group(kind), match.start(kind)
        if kind == "name" and value.lower() in _KEYWORDS:
            kind, value = "keyword", value.lower()
        tokens.append((kind, value, start))
        pos = match.end()
    if not tokens:
        raise WhereError("--where: the expression is empty")
    return tokens


class _Parser:
    """Recursive descent: disjunction := conjunction (or conjunction)*; conjunction := negation (and negation)*;
    negation := not negation | ( disjunction ) | comparison."""

    def __init__(self, text: str, tokens: list[tuple[str, str, int]]):
        self.text, self.tokens, self.i = text, tokens, 0
        self.columns: list[str] = []

    def fail(self, message: str) -> None:
        where = f" (at character {self.tokens[self.i][2] + 1})" if self.i < len(self.tokens) else " (at the end)"
        raise WhereError(f"--where {self.text!r}: {message}{where}")

    def peek(self, kind: str, value: str | None = None) -> bool:
        if self.i >= len(self.tokens):
            return False
        k, v, _ = self.tokens[self.i]
        return k == kind and (value is None or v == value)

    def take(self, kind: str, value: str | None = None, expected: str = "") -> str:
        if not self.peek(kind, value):
            found = repr(self.tokens[self.i][1]) if self.i < len(self.tokens) else "the end"
            self.fail(f"expected {expected or value or kind}, found {found}")
        self.i += 1
        return self.tokens[self.i - 1][1]

    def disjunction(self) -> pc.Expression:
        expression = self.conjunction()
        while self.peek("keyword", "or"):
            self.i += 1
            expression = expression | self.conjunction()
        return expression

    def conjunction(self) -> pc.Expression:
        expression = self.negation()
        while self.peek("keyword", "and"):
            self.i += 1
            expression = expression & self.negation()
        return expression

    def negation(self) -> pc.Expression:
        if self.peek("keyword", "not"):
            self.i += 1
            return ~self.negation()
        if self.peek("paren", "("):
            self.i += 1
            expression = self.disjunction()
            self.take("paren", ")", "')'")
            return expression
        return self.comparison()

    def operand(self) -> pc.Expression:
        if self.peek("number"):
            return pc.scalar(float(self.take("number")))
        name = self.take("name", expected="a column name or a number")
        self.columns.append(name)
        return pc.field(name)

    def comparison(self) -> pc.Expression:
        left = self.operand()
        if self.peek("keyword", "is"):
            self.i += 1
            negated = self.peek("keyword", "not")
            self.i += negated
            self.take("keyword", "null", "'null'")
            return ~left.is_null() if negated else left.is_null()
        op = self.take("op", expected="a comparison (<, <=, >, >=, ==, !=)")
        return _COMPARE[op](left, self.operand())


def group_mask(parquet: pq.ParquetFile, group: int, row_filter: RowFilter | None) -> np.ndarray | None:
    """The rows of row group ``group`` that ``row_filter`` selects (None: no filter, every row). The one place
    readers (``export``, the loader) select rows."""
    if row_filter is None:
        return None
    return row_filter.mask(parquet.read_row_group(group, columns=list(row_filter.columns)))
