"""Who may do what: a token per role, required on every route but the health checks.

    line      a camera station or line client: inspect, read its results
    reviewer  the review page and verdicts (and reading inspections)
    admin     everything, including reload and thresholds

Tokens come from a JSON file ``{"line": {"name": "token", ...}, "reviewer": {...}, "admin": {...}}``
(written with fresh random tokens, readable only by its owner, when missing) or from the
environment (``URD_TOKENS_LINE``, ``URD_TOKENS_REVIEWER``, ``URD_TOKENS_ADMIN``: comma-separated
``name:token`` or bare tokens), which replaces the file's tokens of that role.

API clients send ``Authorization: Bearer <token>``; the review page signs in once and keeps the
token in an HttpOnly, SameSite=Strict cookie, and every form it posts carries a CSRF field derived
from that token (HMAC), which a page on another site cannot compute.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from ..files import atomic_write

ROLES = ("line", "reviewer", "admin")
COOKIE = "urd_session"


@dataclass(frozen=True)
class Caller:
    name: str
    role: str
    token: str

    def may(self, *roles: str) -> bool:
        return self.role == "admin" or self.role in roles


class TokenError(ValueError):
    pass


def _parse_env(value: str, role: str) -> dict[str, str]:
    out = {}
    for i, item in enumerate(filter(None, (v.strip() for v in value.split(",")))):
        name, _, token = item.rpartition(":")
        out[name or f"{role}-{i + 1}"] = token
    return out


def load_tokens(path: str | Path, create: bool = True) -> tuple[dict[str, Caller], Path | None]:
    """token -> Caller, and the file written if one was created."""
    path = Path(path)
    by_role: dict[str, dict[str, str]] = {}
    created = None
    if path.is_file():
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise TokenError(f"{path}: not valid JSON ({exc}); it must map each role ({', '.join(ROLES)}) to {{name: token}}") from None
        unknown = set(data) - set(ROLES)
        if unknown:
            raise TokenError(f"{path}: unknown roles {sorted(unknown)}; the roles are {', '.join(ROLES)}")
        by_role = {role: dict(value) if isinstance(value, dict) else {f"{role}-{i + 1}": t for i, t in enumerate(value)}
                   for role, value in data.items()}
    env = {role: os.environ.get(f"URD_TOKENS_{role.upper()}") for role in ROLES}
    if not by_role and not any(env.values()) and create:
        by_role = {role: {f"{role}-1": secrets.token_urlsafe(24)} for role in ROLES}
        atomic_write(path, lambda tmp: (tmp.write_text(json.dumps(by_role, indent=2) + "\n"), os.chmod(tmp, 0o600)))
        created = path
    for role, value in env.items():
        if value:
            by_role[role] = _parse_env(value, role)
    callers: dict[str, Caller] = {}
    for role, names in by_role.items():
        for name, token in names.items():
            if len(token) < 16:
                raise TokenError(f"the {role} token {name!r} is {len(token)} characters; use at least 16 random characters "
                                 "(python -c 'import secrets; print(secrets.token_urlsafe(24))')")
            callers[token] = Caller(name, role, token)
    if not callers:
        raise TokenError(f"no tokens: write {path} or set URD_TOKENS_LINE / URD_TOKENS_REVIEWER / URD_TOKENS_ADMIN")
    return callers, created


def find_caller(callers: dict[str, Caller], token: str | None) -> Caller | None:
    if not token:
        return None
    for known, caller in callers.items():  # constant-time comparison against each
        if hmac.compare_digest(known.encode(), token.encode()):
            return caller
    return None


def csrf_token(session_token: str) -> str:
    return hmac.new(session_token.encode(), b"urd-csrf", hashlib.sha256).hexdigest()[:32]


def csrf_ok(session_token: str, submitted: str | None) -> bool:
    return bool(submitted) and hmac.compare_digest(csrf_token(session_token), submitted)
