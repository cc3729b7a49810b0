"""ServiceAccount tokens of a sandbox: minted by the kubelet and `kubectl create token`'s stand-in,
checked by the sandbox API server's TokenReview.

A token is an opaque random string recorded in `<state>/tokens.json` with who it names
(`system:serviceaccount:NS:SA`, its groups), the audiences it was minted for and when it expires,
which is all a TokenReview answers. They are not JWTs: nothing but the sandbox API server reads
them, and it looks them up instead of checking a signature.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nodemesh.sandbox.state import flocked, read_json, write_json_atomic

TOKENS_FILE = "tokens.json"
API_AUDIENCE = "https://kubernetes.default.svc.cluster.local"
DEFAULT_TTL_S = 3600


@dataclass(frozen=True)
class Review:
    authenticated: bool
    username: str = ""
    groups: tuple[str, ...] = ()
    audiences: tuple[str, ...] = ()
    error: str = ""


def service_account_user(namespace: str, name: str) -> tuple[str, tuple[str, ...]]:
    """The user a ServiceAccount token names, and its groups, as Kubernetes spells them."""
    return (f"system:serviceaccount:{namespace}:{name}",
            ("system:serviceaccounts", f"system:serviceaccounts:{namespace}", "system:authenticated"))


def mint(state_dir: Path, namespace: str, service_account: str, audiences: list[str],
         ttl_s: int = DEFAULT_TTL_S) -> str:
    """A new token for the ServiceAccount, valid for `audiences` (expired ones are dropped)."""
    username, groups = service_account_user(namespace, service_account)
    token = "sbx." + secrets.token_urlsafe(24)
    now = time.time()
    path = Path(state_dir) / TOKENS_FILE
    with flocked(Path(state_dir) / ".tokens.lock"):
        data: dict[str, Any] = read_json(path, {})
        data = {t: v for t, v in data.items() if v.get("exp", 0) > now}
        data[token] = {"username": username, "groups": list(groups), "audiences": list(audiences or [API_AUDIENCE]),
                       "exp": now + ttl_s}
        write_json_atomic(path, data)
    return token


class TokenBook:
    """The API server's view of the tokens file: re-read when it changes."""

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / TOKENS_FILE
        self._stamp: tuple[int, int] | None = None
        self._tokens: dict[str, Any] = {}

    def _load(self) -> None:
        try:
            st = self.path.stat()
            stamp = (st.st_ino, st.st_mtime_ns)
        except FileNotFoundError:
            stamp = (0, 0)
        if stamp != self._stamp:
            self._tokens = read_json(self.path, {})
            self._stamp = stamp

    def review(self, token: str, audiences: list[str] | None = None) -> Review:
        """A TokenReview: is the token ours, unexpired, and minted for one of `audiences`?
        (No audiences asked: the API server's own.)"""
        self._load()
        entry = self._tokens.get(token)
        if entry is None:
            return Review(False, error="token not found")
        if entry.get("exp", 0) <= time.time():
            return Review(False, error="token expired")
        wanted = audiences or [API_AUDIENCE]
        granted = [a for a in entry["audiences"] if a in wanted]
        if not granted:
            return Review(False, error="token audiences invalid")
        return Review(True, entry["username"], tuple(entry.get("groups", ())), tuple(granted))
