"""Bearer tokens: what one may be, and reading one from a file (the agent and the client alike)."""

from __future__ import annotations

import os
from typing import Optional

#: A token file is read no further than this.
MAX_TOKEN_BYTES = 4096


def token_problem(token: str) -> Optional[str]:
    """Why ``token`` cannot be a bearer token (one word of printable ASCII), or None.
    The answer never quotes the token."""
    if not token:
        return "the token is empty"
    if len(token) > MAX_TOKEN_BYTES:
        return f"the token is longer than {MAX_TOKEN_BYTES} characters"
    if not all("!" <= c <= "~" for c in token):
        return "the token must be printable ASCII characters, without spaces or line breaks"
    return None


def read_token_file(path: str) -> str:
    """The bearer token in a file: one line of printable ASCII (surrounding whitespace,
    such as the final newline, ignored); ``ValueError`` saying why not, which never
    quotes the file's content."""
    try:
        with open(os.path.expanduser(path), "rb") as f:
            data = f.read(MAX_TOKEN_BYTES + 2)
    except OSError as exc:
        raise ValueError(f"cannot read the token file {path}: {exc.strerror or exc}") from None
    text = data.strip().decode("latin-1")
    if not text:
        raise ValueError(f"the token file {path} is empty")
    if len(data) > MAX_TOKEN_BYTES + 1:
        raise ValueError(f"the token file {path} is larger than {MAX_TOKEN_BYTES} bytes: it must hold one token")
    if not all(32 <= b < 127 or b in b"\t\n\r" for b in data):
        raise ValueError(f"the token file {path} is not text (it holds other bytes than printable ASCII): "
                         "it must hold one token")
    if b"\n" in data.strip() or b"\r" in data.strip():
        raise ValueError(f"the token file {path} holds more than one line: it must hold one token")
    problem = token_problem(text)
    if problem:
        raise ValueError(f"the token file {path}: {problem}")
    return text
