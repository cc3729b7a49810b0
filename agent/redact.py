"""What a tap may show of a request: header values and query strings, redacted at the agent.

Tap events leave the node (agent -> controller -> CLI or dashboard), so secrets are taken out
before an event is built, never after: `Authorization`, `Proxy-Authorization`, `Cookie` and
`Set-Cookie` always, plus the headers the mesh config names (`--tap-redact-headers`). With an allow
list (`--tap-show-headers`, like Hubble's `--hubble-redact-http-headers-allow`) every header not on
it is redacted too; the four above stay redacted even when allowed. Query strings (in the path and
in HTTP/2's `:path`) are kept unless `--tap-redact-query`: then every value is replaced, names
kept (`/search?q=[REDACTED]&page=[REDACTED]`). Sans-IO: lists of (name, value) in, lists out.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

REDACTED = "[REDACTED]"
ALWAYS_REDACTED = frozenset({"authorization", "proxy-authorization", "cookie", "set-cookie"})


@dataclass(frozen=True, slots=True)
class Redaction:
    deny: frozenset[str] = ALWAYS_REDACTED   # lower-case names whose values are replaced
    allow: frozenset[str] = frozenset()      # when non-empty: only these names keep their values
    query: bool = False                      # replace query-string values

    @classmethod
    def build(cls, deny: Iterable[str] = (), allow: Iterable[str] = (), query: bool = False) -> Redaction:
        return cls(ALWAYS_REDACTED | {h.strip().lower() for h in deny if h.strip()},
                   frozenset(h.strip().lower() for h in allow if h.strip()), query)

    def hides(self, name: str) -> bool:
        lname = name.lower()
        if lname in self.deny:
            return True
        # Pseudo-headers (:method, :path, ...) are the request line, not headers: an allow list
        # leaves them alone (the query rule still applies to :path).
        return bool(self.allow) and not lname.startswith(":") and lname not in self.allow

    def headers(self, headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
        out = []
        for name, value in headers:
            if self.hides(name):
                value = REDACTED
            elif self.query and name == ":path":
                value = self.path(value)
            out.append((name, value))
        return out

    def path(self, path: str) -> str:
        if not self.query:
            return path
        base, sep, query = path.partition("?")
        if not sep:
            return path
        fragment = ""
        query, hsep, frag = query.partition("#")
        if hsep:
            fragment = "#" + frag
        parts = []
        for item in query.split("&"):
            name, eq, _ = item.partition("=")
            # A bare `?abc123` may be the secret itself: only empty items are kept as they are.
            parts.append(f"{name}={REDACTED}" if eq else (REDACTED if item else item))
        return f"{base}?{'&'.join(parts)}{fragment}"


DEFAULT = Redaction()
