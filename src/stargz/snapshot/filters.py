"""containerd's filter syntax (``containerd/filters``), as ``List`` receives it.

Grammar (comma = AND inside one filter; several filters are OR-ed)::

    selectors := selector ("," selector)*
    selector  := fieldpath [operator value]
    fieldpath := field ("." field)*
    field     := quoted | [A-Za-z0-9_-]+
    operator  := "==" | "!=" | "~="
    value     := quoted | [^\\s,]+
    quoted    := "..." with Go escapes, or /.../ and |...| (for regular expressions)

A selector with no operator tests that the field is present. Snapshots expose the fields
``name``, ``parent``, ``kind`` (``active``, ``view``, ``committed``) and ``labels.<key>``
(write a key with dots or other characters quoted: ``labels."containerd.io/gc.root"``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from stargz.errors import InvalidArgument

from .types import Info

#: A parsed filter: takes a field getter (fieldpath -> value or None) and answers.
Matcher = Callable[[Callable[[Sequence[str]], str | None]], bool]

_QUOTES = '"/|'
_OPERATORS = ("==", "!=", "~=")
_SIMPLE_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v"}


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def error(self, msg: str) -> InvalidArgument:
        return InvalidArgument(f"filters: parse error at {self.pos} in {self.text!r}: {msg}")

    def skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def peek(self) -> str:
        self.skip_space()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def quoted(self) -> str:
        quote = self.text[self.pos]
        out: list[str] = []
        i = self.pos + 1
        while True:
            if i >= len(self.text) or self.text[i] == "\n":
                raise self.error("quoted literal not terminated")
            c = self.text[i]
            if c == quote:
                self.pos = i + 1
                return "".join(out)
            if c != "\\":
                out.append(c)
                i += 1
                continue
            i += 1
            e = self.text[i] if i < len(self.text) else ""
            if e in _SIMPLE_ESCAPES:
                out.append(_SIMPLE_ESCAPES[e])
                i += 1
            elif e == "\\" or (e == quote):
                out.append(e)
                i += 1
            elif e in "xuU":
                n = {"x": 2, "u": 4, "U": 8}[e]
                digits = self.text[i + 1 : i + 1 + n]
                if len(digits) != n or not all(d in "0123456789abcdefABCDEF" for d in digits):
                    raise self.error("illegal escape sequence")
                out.append(chr(int(digits, 16)))
                i += 1 + n
            elif e in "01234567":
                digits = self.text[i : i + 3]
                if len(digits) != 3 or not all(d in "01234567" for d in digits):
                    raise self.error("illegal escape sequence")
                out.append(chr(int(digits, 8)))
                i += 3
            else:
                raise self.error("illegal escape sequence")

    def field(self) -> str:
        c = self.peek()
        if c and c in _QUOTES:
            return self.quoted()
        start = self.pos
        while self.pos < len(self.text) and (
            self.text[self.pos].isascii()
            and (self.text[self.pos].isalnum() or self.text[self.pos] in "-_")
        ):
            self.pos += 1
        if self.pos == start:
            raise self.error("expected field or quoted")
        return self.text[start : self.pos]

    def value(self) -> str:
        c = self.peek()
        if not c:
            raise self.error("expected value or quoted")
        if c in _QUOTES:
            return self.quoted()
        start = self.pos
        while self.pos < len(self.text) and not (
            self.text[self.pos] == "," or self.text[self.pos].isspace()
        ):
            self.pos += 1
        return self.text[start : self.pos]

    def selector(self) -> Matcher:
        path = [self.field()]
        while self.peek() == ".":
            self.pos += 1
            path.append(self.field())
        c = self.peek()
        if c in ("", ","):
            return lambda get, p=path: get(p) is not None
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] in "=!~":
            self.pos += 1
        op = self.text[start : self.pos]
        if op not in _OPERATORS:
            self.pos = start
            raise self.error('expected an operator ("=="|"!="|"~=")')
        value = self.value()
        if op == "==":
            return lambda get, p=path, v=value: get(p) == v
        if op == "!=":
            return lambda get, p=path, v=value: (get(p) or "") != v
        try:
            rx = re.compile(value)
        except re.error as e:
            raise self.error(f"bad regular expression {value!r}: {e}") from None
        return lambda get, p=path, r=rx: r.search(get(p) or "") is not None

    def parse(self) -> Matcher:
        selectors = [self.selector()]
        while True:
            c = self.peek()
            if c == "":
                break
            if c != ",":
                raise self.error(f"unexpected input: {c!r}")
            self.pos += 1
            selectors.append(self.selector())
        return lambda get: all(s(get) for s in selectors)


def parse(filters: Sequence[str]) -> Callable[[Info], bool]:
    """Compile ``filters`` (OR-ed; none or an empty string matches everything)."""
    matchers = [_Parser(f).parse() for f in filters if f != ""]
    if len(matchers) < len(filters) or not matchers:
        return lambda info: True

    def match(info: Info) -> bool:
        get = _fields(info)
        return any(m(get) for m in matchers)

    return match


def _fields(info: Info) -> Callable[[Sequence[str]], str | None]:
    def get(path: Sequence[str]) -> str | None:
        head = path[0]
        if head == "name":
            return info.name
        if head == "parent":
            return info.parent
        if head == "kind":
            return info.kind.filter_name
        if head == "labels" and len(path) > 1:
            return info.labels.get(".".join(path[1:]))
        return None

    return get
