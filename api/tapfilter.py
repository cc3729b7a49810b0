"""The request fields of a tap filter, checked once: for the CLI, the dashboard and the controller.

The controller is the authority (`Controller.validate_tap` refuses what this refuses, whoever sent
it); the CLI and the dashboard call the same check first so that a typo is one line naming their own
flag or parameter (`--method` on the command line, `method` in the web API).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

from nodemesh.api.gen import nodemesh_pb2 as pb

# An HTTP method is a token (RFC 9110 §9.1, §5.6.2): `M-SEARCH` and `PROPFIND` are methods too.
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
SCHEMES = ("http", "https")


class TapFilterError(ValueError):
    """A tap filter field the user got wrong; the message is one line meant for them."""


def check_fields(flt: pb.TapFilter, name: Callable[[str], str] = lambda field: field) -> pb.TapFilter:
    """Refuse a bad method, path prefix, scheme or rate (`name` spells the field as the caller's user
    typed it); returns `flt` with the method upper-cased and the scheme lower-cased, as tap matches."""
    if flt.method and not _TOKEN.match(flt.method):
        raise TapFilterError(f"invalid {name('method')} {flt.method!r}: an HTTP method (a token like GET or M-SEARCH)")
    if flt.path_prefix and not flt.path_prefix.startswith("/"):
        raise TapFilterError(f"invalid {name('path')} {flt.path_prefix!r}: a path prefix starts with '/'")
    if flt.scheme and flt.scheme.lower() not in SCHEMES:
        raise TapFilterError(f"invalid {name('scheme')} {flt.scheme!r}: expected http or https")
    if math.isnan(flt.max_rps) or flt.max_rps < 0 or math.isinf(flt.max_rps):
        raise TapFilterError(f"{name('max_rps')} must be positive, got {flt.max_rps:g}")
    flt.method = flt.method.upper()
    flt.scheme = flt.scheme.lower()
    return flt


__all__ = ["SCHEMES", "TapFilterError", "check_fields"]
