"""Who may do what: API keys, the deployments each may use, its jobs, its request rate.

Keys are kept hashed (SHA-256 of the key; a key is 32 random bytes, so a fast hash is
as safe as a slow one) in a TOML file (`--keys FILE`, $PIPEQ_API_KEYS_FILE) or the same
TOML in $PIPEQ_API_KEYS:

    [keys.web-backend]
    sha256 = "9f86d08..."              # `pipeq serve --new-key web-backend` makes one
    deployments = ["sentiment-analysis"]   # or ["*"]: every deployment
    rate_per_s = 50                    # optional: requests a second (token bucket)
    burst = 100                        # optional: at once (default 2 x rate_per_s)

A request carries its key as `Authorization: Bearer <key>` (what Hugging Face's clients
send). With no key configured the gateway is open, but only to loopback clients (and
`pipeq serve` refuses a non-loopback address). Keys never appear in logs: a caller is
named by its entry's name. A key reads, follows and cancels only the jobs it submitted;
another's job id answers 404, as an unknown one does.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import secrets
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from fastapi import Request

from pipeq.serve._errors import ApiError

T = TypeVar("T")

__all__ = [
    "KEYS_ENV",
    "KEYS_FILE_ENV",
    "Caller",
    "Keys",
    "hash_key",
    "load_keys",
    "new_key",
]

KEYS_FILE_ENV = "PIPEQ_API_KEYS_FILE"
KEYS_ENV = "PIPEQ_API_KEYS"
#: the caller of an open gateway (no key configured; loopback only)
LOCAL = "local"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    """A fresh API key: 'pq_' + 43 URL-safe characters (32 random bytes)."""
    return "pq_" + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class Caller:
    """Who sent a request: the key's name (`LOCAL` on an open gateway), the deployments
    it may use (None: all), and its rate limit (None: none)."""

    name: str
    deployments: frozenset[str] | None = None
    rate_per_s: float | None = None
    burst: float | None = None

    def may_use(self, deployment: str) -> bool:
        return self.deployments is None or deployment in self.deployments

    def require(self, deployment: str) -> None:
        """ApiError 403 unless this caller may use `deployment`."""
        if not self.may_use(deployment):
            raise ApiError(
                403,
                "Forbidden",
                f"this API key may not use deployment {deployment!r}",
                deployment=deployment,
            )


@dataclass(frozen=True)
class Keys:
    """The configured keys, by their hash."""

    by_hash: Mapping[str, Caller]

    def find(self, key: str) -> Caller | None:
        digest = hash_key(key)
        for known, caller in self.by_hash.items():  # constant time in the key's hash
            if hmac.compare_digest(known, digest):
                return caller
        return None


def parse_keys(text: str, where: str) -> Keys:
    """Keys from TOML text; ValueError naming what is wrong (never a key)."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{where}: not TOML: {e}") from None
    entries = doc.get("keys")
    if not isinstance(entries, dict) or not entries:
        raise ValueError(f"{where}: no [keys.<name>] table")
    by_hash: dict[str, Caller] = {}
    for name, entry in entries.items():
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: keys.{name} is not a table")
        digest = str(entry.get("sha256", "")).lower()
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ValueError(f"{where}: keys.{name}.sha256 must be 64 hex digits")
        deployments = entry.get("deployments", [])
        if not isinstance(deployments, list) or not all(isinstance(d, str) for d in deployments):
            raise ValueError(f"{where}: keys.{name}.deployments must be a list of names")
        rate = entry.get("rate_per_s")
        if rate is not None and (not isinstance(rate, int | float) or rate <= 0):
            raise ValueError(f"{where}: keys.{name}.rate_per_s must be > 0")
        burst = entry.get("burst", 2 * rate if rate else None)
        if burst is not None and (not isinstance(burst, int | float) or burst < 1):
            raise ValueError(f"{where}: keys.{name}.burst must be >= 1")
        by_hash[digest] = Caller(
            name=str(name),
            deployments=None if "*" in deployments else frozenset(deployments),
            rate_per_s=float(rate) if rate else None,
            burst=float(burst) if burst else None,
        )
    return Keys(by_hash)


def load_toml(
    parse: Callable[[str, str], T],
    what: str,
    path: str | None,
    file_env: str,
    text_env: str,
    env: Mapping[str, str],
) -> T | None:
    """`parse(text, where)` of the file at `path`, else of the file $`file_env` names, else
    of $`text_env`'s TOML; None when none is given. ValueError for a file that cannot be
    read (naming the `what` file, e.g. "keys") or whatever `parse` refuses."""
    path = path or env.get(file_env)
    if path:
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ValueError(f"cannot read the {what} file {path}: {e.strerror}") from None
        return parse(text, path)
    if env.get(text_env):
        return parse(env[text_env], f"${text_env}")
    return None


def load_keys(path: str | None = None, env: Mapping[str, str] = os.environ) -> Keys | None:
    """The keys of `path`, else $PIPEQ_API_KEYS_FILE's, else $PIPEQ_API_KEYS' TOML; None
    when none is configured. ValueError for a file that cannot be used."""
    return load_toml(parse_keys, "keys", path, KEYS_FILE_ENV, KEYS_ENV, env)


def is_loopback_client(host: str | None) -> bool:
    if not host:
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def identify(request: Request, keys: Keys | None) -> Caller:
    """The caller of a request; ApiError 401 without a valid key (with no keys
    configured: from anywhere but loopback)."""
    if keys is None:
        if is_loopback_client(request.client.host if request.client else None):
            return Caller(LOCAL)
        raise ApiError(
            401, "Unauthorized", "this gateway has no API keys: it answers loopback only"
        )
    token = bearer(request)
    caller = keys.find(token) if token else None
    if caller is None:
        raise ApiError(401, "Unauthorized", "a valid API key is needed (Authorization: Bearer)")
    return caller


# -- per-key rate limit: a token bucket in Redis, shared by every gateway process ----------
RATE_SCRIPT = """
if redis.replicate_commands then redis.replicate_commands() end
-- KEYS: bucket ; ARGV: rate per s, burst. Returns 0 (allowed) or the seconds to wait.
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local b = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(b[1]) or burst
local at = tonumber(b[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
if tokens < 1 then return tostring((1 - tokens) / rate) end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens - 1), 'at', tostring(now))
redis.call('EXPIRE', KEYS[1], math.ceil(burst / rate) + 1)
return '0'
"""


def rate_key(caller: Caller) -> str:
    return f"pipeq:rate:{caller.name}"


async def check_rate(aredis: Any, script: Any, caller: Caller) -> None:
    """ApiError 429 (+ Retry-After) when the caller's bucket is empty."""
    if caller.rate_per_s is None:
        return
    burst = caller.burst or 2 * caller.rate_per_s
    wait = float(
        await script(keys=[rate_key(caller)], args=[caller.rate_per_s, burst], client=aredis)
    )
    if wait > 0:
        raise ApiError(
            429,
            "RateLimited",
            f"over this key's rate ({caller.rate_per_s:g} requests/s, burst {burst:g})",
            retry_after_s=wait,
        )
