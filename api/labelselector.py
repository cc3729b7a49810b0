"""Kubernetes label selectors (`-l`): one grammar for the CLI, the dashboard and the controller.

The controller is the authority (it filters with what this parses); the CLI parses first only to
print a typo as one line before anything is sent. The grammar and the checks follow Kubernetes'
own parser (apimachinery `labels.Parse`), so a selector means here what it means to kubectl:

    selector    = requirement ("," requirement)*
    requirement = "!" KEY
                | KEY [ ("=" | "==" | "!=") [VALUE] | ("in" | "notin") "(" VALUE ("," VALUE)* ")"
                      | (">" | "<") INTEGER ]

Whitespace separates tokens and is otherwise ignored (`env in(a,b)`, `env in (a, b)`); an identifier
is any run of characters that are neither whitespace nor one of `!=(),<>`. Keys are qualified names
(an optional DNS-subdomain prefix and `/`, then at most 63 alphanumerics, `-`, `_`, `.`, beginning
and ending alphanumeric); values are empty or the same shape as the name. `!=` and `notin` match
objects without the key, as in Kubernetes; `>`/`<` need the key and an integer value.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

_NAME = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_SPECIAL = "!=(),<>"
_OPERATORS = ("==", "!=", "=", "in", "notin", ">", "<")


class LabelSelectorError(ValueError):
    """A selector that does not parse; the message is one line meant for the user."""


@dataclass(frozen=True)
class Requirement:
    key: str
    op: str                   # "=", "!=", "in", "notin", "exists", "!exists", ">", "<"
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        present = self.key in labels
        value = labels.get(self.key)
        if self.op == "exists":
            return present
        if self.op == "!exists":
            return not present
        if self.op in ("=", "in"):
            return present and value in self.values
        if self.op in ("!=", "notin"):
            return not present or value not in self.values
        # ">" / "<": the label's value must be an integer too, as in Kubernetes
        try:
            have = int(value) if value is not None else None
        except ValueError:
            return False
        want = int(self.values[0])
        return have is not None and (have > want if self.op == ">" else have < want)


def _tokens(text: str) -> list[str]:
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch.isspace():
            i += 1
        elif ch in _SPECIAL:
            two = text[i:i + 2]
            if two in ("==", "!="):
                out.append(two)
                i += 2
            else:
                out.append(ch)
                i += 1
        else:
            j = i
            while j < n and not text[j].isspace() and text[j] not in _SPECIAL:
                j += 1
            out.append(text[i:j])
            i = j
    return out


def _check_key(key: str) -> str:
    prefix, sep, name = key.rpartition("/")
    if sep and (not prefix or len(prefix) > 253 or not _DNS_SUBDOMAIN.match(prefix)):
        raise LabelSelectorError(f"invalid label key {key!r}: the prefix must be a DNS subdomain (e.g. example.com)")
    if not name or len(name) > 63 or not _NAME.match(name):
        raise LabelSelectorError(f"invalid label key {key!r}: a name of at most 63 characters, alphanumerics, "
                                 "'-', '_' or '.', beginning and ending with an alphanumeric")
    return key


def _check_value(value: str) -> str:
    if value and (len(value) > 63 or not _NAME.match(value)):
        raise LabelSelectorError(f"invalid label value {value!r}: empty, or at most 63 characters, alphanumerics, "
                                 "'-', '_' or '.', beginning and ending with an alphanumeric")
    return value


def _identifier(tok: str | None) -> bool:
    return tok is not None and tok not in _SPECIAL and tok not in ("==", "!=")


def _found(tok: str | None) -> str:
    return "the end" if tok is None else repr(tok)


def parse(text: str) -> list[Requirement]:
    """Every requirement of `text` (an empty selector selects everything). LabelSelectorError names
    what was found where and what was expected."""
    try:
        return _Parser(_tokens(text)).selector()
    except LabelSelectorError as exc:
        raise LabelSelectorError(f"invalid label selector {text!r}: {exc}") from None


class _Parser:
    def __init__(self, toks: list[str]) -> None:
        self.toks = toks
        self.pos = 0

    def peek(self) -> str | None:
        return self.toks[self.pos] if self.pos < len(self.toks) else None

    def take(self) -> str | None:
        tok = self.peek()
        self.pos += 1
        return tok

    def selector(self) -> list[Requirement]:
        reqs: list[Requirement] = []
        if not self.toks:
            return reqs
        while True:
            reqs.append(self.requirement())
            after = self.take()
            if after is None:
                return reqs
            if after != ",":
                raise LabelSelectorError(f"found {_found(after)}, expected: ',' or the end")

    def requirement(self) -> Requirement:
        tok = self.take()
        if tok == "!":
            key = self.take()
            if key is None or not _identifier(key):
                raise LabelSelectorError(f"found {_found(key)}, expected: a label key after '!'")
            return Requirement(_check_key(key), "!exists")
        if tok is None or not _identifier(tok) or tok in ("in", "notin"):
            raise LabelSelectorError(f"found {_found(tok)}, expected: a label key or '!'")
        key = _check_key(tok)
        op = self.peek()
        if op is None or op == ",":
            return Requirement(key, "exists")
        if op not in _OPERATORS:
            raise LabelSelectorError(f"found {_found(op)}, expected: in, notin, =, ==, !=, >, <")
        self.take()
        if op in ("in", "notin"):
            return Requirement(key, op, self.values(op))
        nxt = self.peek()
        value = nxt if nxt is not None and _identifier(nxt) else ""  # `app=`, `app==`: the empty value
        if value:
            self.take()
        if op in (">", "<"):
            if not re.fullmatch(r"-?[0-9]+", value):
                raise LabelSelectorError(f"{op!r} needs an integer value, found {_found(value or None)}")
            return Requirement(key, op, (value,))
        return Requirement(key, "!=" if op == "!=" else "=", (_check_value(value),))

    def values(self, op: str) -> tuple[str, ...]:
        if self.peek() != "(":
            raise LabelSelectorError(f"found {_found(self.peek())}, expected: '(' after {op!r}")
        self.take()
        values: list[str] = []
        expect_value = True
        while True:
            tok = self.take()
            if tok == ")":
                if expect_value and values:
                    values.append("")  # `(a,)`: an empty value, as Kubernetes reads it
                break
            if tok == ",":
                if expect_value:
                    values.append("")
                expect_value = True
            elif tok is not None and _identifier(tok) and expect_value:
                values.append(_check_value(tok))
                expect_value = False
            else:
                raise LabelSelectorError(f"found {_found(tok)}, expected: a value, ',' or ')'")
        if not values:
            raise LabelSelectorError(f"{op!r} needs at least one value")
        return tuple(values)


__all__ = ["LabelSelectorError", "Requirement", "parse"]
