"""One reading of a Redis URL for every part of pipeq: producers, workers, Flower, the
exporter and `pipeq status` (docs/redis.md).

    redis://[[user]:password@]host:port/db
    rediss://[[user]:password@]host:port/db[?ssl_ca_certs=CA&ssl_certfile=C&ssl_keyfile=K]
    sentinel://[[user]:password@]h1:p1;sentinel://h2:p2;.../db?master_name=NAME
        [&sentinel_password=P][&sentinel_username=U]
    unix:///path/to/redis.sock?db=0

`rediss://` verifies the server's certificate: against `ssl_ca_certs` when given, else
the system's CAs. `ssl_cert_reqs` may loosen that (`none`, `optional`; also spelt
`CERT_NONE`, `CERT_OPTIONAL`), never by default. Celery and kombu each read TLS options
from a URL their own way (kombu's `rediss://` without options means *no* verification),
so pipeq strips them from the URL it hands Celery and sets `broker_use_ssl` /
`redis_backend_use_ssl` itself; plain redis-py clients come from `RedisTarget.client`.
"""

from __future__ import annotations

import re
import ssl
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, unquote_plus, urlencode, urlsplit, urlunsplit

import redis
import redis.sentinel
from redis.backoff import NoBackoff
from redis.connection import URL_QUERY_ARGUMENT_PARSERS
from redis.retry import Retry

__all__ = ["RedisTarget", "masked", "parse", "scrub"]

SSL_KEYS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs")
SENTINEL_KEYS = ("master_name", "sentinel_password", "sentinel_username")
SENTINEL_PORT = 26379
_CERT_REQS = {
    "required": ssl.CERT_REQUIRED,
    "optional": ssl.CERT_OPTIONAL,
    "none": ssl.CERT_NONE,
}


def cert_reqs(value: str) -> ssl.VerifyMode:
    """`required`, `CERT_REQUIRED` (Celery's spelling) and the like, as ssl's constant."""
    key = value.strip().lower().removeprefix("cert_")
    if key not in _CERT_REQS:
        raise ValueError(f"ssl_cert_reqs must be required, optional or none, not {value!r}")
    return _CERT_REQS[key]


def _netloc(host: str, port: int | None, username: str | None, password: str | None) -> str:
    where = f"[{host}]" if ":" in host else host
    if port is not None:
        where = f"{where}:{port}"
    if password is None and not username:
        return where
    user = quote(username or "", safe="")
    return f"{user}:{quote(password or '', safe='')}@{where}"


#: characters a URL reserves: in a password they must be percent-encoded
RESERVED = frozenset("@:/;?&#[]")
#: options a Redis URL's query may hold (redis-py's and pipeq's): where a password given
#: as an option (`sentinel_password=...`) ends, when its value holds an unencoded `&`
_OPTIONS = frozenset(
    {*SSL_KEYS, *SENTINEL_KEYS, "db", "username", "password", *URL_QUERY_ARGUMENT_PARSERS}
)
_HOST_PORT = re.compile(r"([A-Za-z0-9._~-]+|\[[0-9A-Fa-f:.]+\])(:[0-9]+)?")
_ENCODE = "percent-encode every @ : / ; ? & # in a password (urllib.parse.quote(password, safe=''))"


def _host_chunks(url: str) -> list[tuple[int, int]]:
    """(start, end) of each host of a sentinel:// URL that splits cleanly on ';' (each
    part a sentinel://[credentials@]host:port, no host with credentials after one
    without: a password holding ';sentinel://' splits so); else the whole URL, as one
    part, which hides more."""
    whole = [(0, len(url))]
    pieces = url.split(";")
    if len(pieces) == 1 or not url.lower().startswith("sentinel://"):
        return whole
    bounds, begin, credentials = [], 0, []
    for i, piece in enumerate(pieces):
        rest = piece[len("sentinel://") :]
        if not piece.lower().startswith("sentinel://") or rest.count("@") > 1:
            return whole
        host = re.split(r"[/?#]", rest.rpartition("@")[2], maxsplit=1)
        if not _HOST_PORT.fullmatch(host[0]) or (len(host) > 1 and i < len(pieces) - 1):
            return whole
        credentials.append("@" in rest)
        bounds.append((begin, begin + len(piece)))
        begin += len(piece) + 1
    if credentials != sorted(credentials, reverse=True):
        return whole
    return bounds


def _secret_spans(url: str) -> list[tuple[int, int]]:
    """Where `url` may hold a password, under any reading of it: each host's credentials
    (up to its last '@', so that an unencoded '@', '/', '?', '#' or ';' in a password
    cannot end it early; the user name stays when it is plainly one), and the value of
    every option named like a password (up to the next option pipeq knows)."""
    spans = []
    for begin, end in _host_chunks(url):
        at = url.rfind("@", begin, end)
        if at < 0:
            continue
        scheme_end = url.find("://", begin, at)
        start = begin if scheme_end < 0 else scheme_end + 3
        user, colon, _ = url[start:at].partition(":")
        plain_user = colon and not set(user) & RESERVED
        spans.append((start + len(user) + 1 if plain_user else start, at))
    for option in re.finditer(r"[?&;]([^=&?;]*)=", url):
        if "password" not in unquote_plus(option.group(1)).lower():
            continue
        ends = (
            m.start()
            for m in re.finditer(r"&([^=&]*)=", url[option.end() :])
            if unquote_plus(m.group(1)).lower() in _OPTIONS
        )
        spans.append((option.end(), option.end() + next(ends, len(url) - option.end())))
    return spans


def masked(url: str) -> str:
    """The URL with every password in it (each host's, `sentinel_password`, any option
    named like a password) replaced by ***, encoded or not: where a URL can be read in
    several ways (a password with an unencoded '@', '#', ';', ...), everything that
    could be a password is hidden."""
    merged: list[list[int]] = []
    for start, end in sorted(_secret_spans(url)):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    out, shown = [], 0
    for start, end in merged:
        out += [url[shown:start], "***"]
        shown = end
    return "".join(out) + url[shown:]


def scrub(text: str, url: str) -> str:
    """`text` (an error's message, a server's reply) without any password `url` holds,
    in any form: what a client library or a server may echo back."""
    secrets = set()
    for start, end in _secret_spans(url):
        raw = url[start:end]
        secrets |= {raw, unquote(raw), unquote_plus(raw), quote(unquote(raw), safe="")}
    for secret in sorted((s for s in secrets if len(s) >= 3), key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


@dataclass(frozen=True)
class RedisTarget:
    """A Redis URL taken apart: where Redis is, how to authenticate and encrypt."""

    url: str
    scheme: str
    #: (host, port) of the server, or of each sentinel
    hosts: tuple[tuple[str, int], ...] = ()
    username: str | None = None
    password: str | None = None
    db: int = 0
    #: redis-py's TLS arguments (ssl_cert_reqs, ssl_ca_certs, ...); None: no TLS
    ssl: dict[str, Any] | None = None
    master_name: str | None = None
    sentinel_username: str | None = None
    sentinel_password: str | None = None
    #: query arguments left for redis-py and Celery (socket_timeout=...)
    query: dict[str, str] = field(default_factory=dict)

    @property
    def sentinel(self) -> bool:
        return self.scheme == "sentinel"

    @property
    def masked(self) -> str:
        return masked(self.url)

    @property
    def celery_url(self) -> str:
        """The URL as Celery's broker and backend read it: pipeq's own options out (TLS,
        the sentinel master), and for Sentinel each host with the credentials and db."""
        if self.scheme not in ("redis", "rediss", "sentinel"):
            return self.url
        query = urlencode(self.query)
        chunks = [
            urlunsplit(
                (
                    self.scheme,
                    _netloc(host, port, self.username, self.password),
                    f"/{self.db}",
                    query,
                    "",
                )
            )
            for host, port in self.hosts
        ]
        return ";".join(chunks)

    def sentinel_kwargs(self, **socket: Any) -> dict[str, Any]:
        """redis-py's arguments for the connections to the sentinels themselves."""
        kwargs = dict(socket)
        if self.sentinel_password is not None:
            kwargs["password"] = self.sentinel_password
        if self.sentinel_username is not None:
            kwargs["username"] = self.sentinel_username
        return kwargs

    def transport_options(self, socket_timeout: float | None = None) -> dict[str, Any]:
        """What kombu's and Celery's Sentinel classes need beyond the URL (empty if not
        Sentinel): the master's name, and how to talk to the sentinels."""
        if not self.sentinel:
            return {}
        socket = {"socket_connect_timeout": 2.0, "socket_timeout": socket_timeout or 2.0}
        return {"master_name": self.master_name, "sentinel_kwargs": self.sentinel_kwargs(**socket)}

    def client(self, **kwargs: Any) -> redis.Redis:
        """A redis-py client (of the current master, for Sentinel); `kwargs` are redis-py's
        connection arguments (socket_connect_timeout=...)."""
        if self.sentinel:
            socket = {k: v for k, v in kwargs.items() if k.startswith("socket_")}
            # redis-py retries each sentinel 3 times, a second and more apart: pipeq's
            # callers retry for their own bounded time (Client.broker_timeout_s)
            once = Retry(NoBackoff(), 0)
            manager = redis.sentinel.Sentinel(  # type: ignore[no-untyped-call]
                list(self.hosts), sentinel_kwargs=self.sentinel_kwargs(**socket, retry=once)
            )
            assert self.master_name is not None
            return manager.master_for(  # type: ignore[no-untyped-call,no-any-return]
                self.master_name,
                username=self.username,
                password=self.password,
                db=self.db,
                **kwargs,
            )
        if self.scheme not in ("redis", "rediss"):
            return redis.Redis.from_url(self.url, **kwargs)
        return redis.Redis.from_url(self.celery_url, **kwargs, **(self.ssl or {}))

    def aclient(self, **kwargs: Any) -> Any:
        """`client`'s asyncio twin (redis.asyncio), for `pipeq serve`'s waits and streams;
        `kwargs` are its pool's (max_connections=, timeout=: how long a caller waits for
        a free connection) and connections' (socket_connect_timeout=...)."""
        import redis.asyncio as aredis
        from redis.asyncio.retry import Retry as AsyncRetry

        if self.sentinel:
            socket = {k: v for k, v in kwargs.items() if k.startswith("socket_")}
            once = AsyncRetry(NoBackoff(), 0)
            manager = aredis.sentinel.Sentinel(  # type: ignore[no-untyped-call]
                list(self.hosts), sentinel_kwargs=self.sentinel_kwargs(**socket, retry=once)
            )
            assert self.master_name is not None
            return manager.master_for(
                self.master_name,
                username=self.username,
                password=self.password,
                db=self.db,
                **kwargs,
            )
        # a bounded pool that makes callers wait for a free connection (`timeout`, s)
        # rather than opening one more: thousands of waiting requests share a few
        if self.scheme not in ("redis", "rediss"):
            pool = aredis.BlockingConnectionPool.from_url(self.url, **kwargs)
        else:
            pool = aredis.BlockingConnectionPool.from_url(
                self.celery_url, **kwargs, **(self.ssl or {})
            )
        return aredis.Redis.from_pool(pool)


def _port(parts: Any, default: int, hint: str) -> int:
    try:
        port = parts.port
    except ValueError:  # urllib's message quotes the port: a password's piece, maybe
        raise ValueError(f"the port must be a number from 0 to 65535{hint}") from None
    return int(port) if port is not None else default


def _split(url: str, hint: str) -> Any:
    """urlsplit, whose errors quote the URL's pieces (a bracketed host that is no IPv6
    address: maybe a password's '[')."""
    try:
        return urlsplit(url)
    except ValueError:
        raise ValueError(f"not a URL pipeq can read{hint}") from None


def _misread(parts: Any) -> bool:
    """Whether a URL's part reads as no Redis URL is written: an '@' after the host, or
    an option that is not key=value. That is what a password with an unencoded '/', '?'
    or '&' leaves (the '@' that ends it lands in the path or the options)."""
    if "@" in parts.path:
        return True
    for option in filter(None, parts.query.split("&")):
        key, eq, value = option.partition("=")
        if not eq or "@" in key:
            return True
        if "@" in value and unquote_plus(key) not in (*SSL_KEYS, *SENTINEL_KEYS):
            return True
    return False


def _not_options(keys: Any, where: str, secret_option: bool) -> str:
    """The message for options `where` does not take, naming them unless a password is
    among the options: its unencoded '&' or '=' would make a piece of it one."""
    if secret_option:
        return f"options that are not options of {where}; {_ENCODE}"
    return f"{', '.join(keys)}: not an option of {where}"


def parse(url: str) -> RedisTarget:
    """The URL taken apart; ValueError when it cannot be used, whose message never
    quotes a part of the URL that could hold a password."""
    scheme = url.partition("://")[0].lower()
    # a password's unencoded '#', ';', '/', '?' or '&' makes the URL read otherwise
    hint = f"; {_ENCODE}" if "@" in url else ""
    if scheme not in ("redis", "rediss", "sentinel", "unix"):
        raise ValueError("a Redis URL starts with redis://, rediss://, sentinel:// or unix://")
    if "#" in url:
        raise ValueError(f"a Redis URL has no '#' part{hint or '; percent-encode it: %23'}")
    if scheme == "unix":
        if _misread(_split(url, hint)):
            raise ValueError(f"not a unix://[[user]:password@]/path?db=N URL{hint}")
        return RedisTarget(url=url, scheme=scheme)
    chunks = url.split(";")
    if scheme != "sentinel" and len(chunks) > 1:
        raise ValueError(f"several hosts (';') are for sentinel:// URLs only{hint}")
    hosts: list[tuple[str, int]] = []
    username = password = None
    db: int | None = None
    query: dict[str, str] = {}
    named: list[str] = []  # every option's name, a blank one's too
    for chunk in chunks:
        parts = _split(chunk.strip(), hint)
        if parts.scheme.lower() != scheme:
            raise ValueError(f"every host of the URL must be {scheme}://{hint}")
        if _misread(parts):
            raise ValueError(f"not a {scheme}://[[user]:password@]host:port/db URL{hint}")
        hosts.append(
            (
                parts.hostname or "127.0.0.1",
                _port(parts, SENTINEL_PORT if scheme == "sentinel" else 6379, hint),
            )
        )
        if parts.password is not None and password is None:
            password = unquote(parts.password)
        if parts.username and username is None:
            username = unquote(parts.username)
        path = parts.path.strip("/")
        if path and db is None:
            try:
                db = int(path)
            except ValueError:
                # (not quoted: a password's unencoded '/' or ';' may have made it)
                raise ValueError(f"the database (the URL's path) must be a number{hint}") from None
        query.update(dict(parse_qsl(parts.query)))
        named += [k for k, _ in parse_qsl(parts.query, keep_blank_values=True)]
    secret_option = any("password" in k.lower() for k in named)
    if "db" in query and db is None:
        if not query["db"].isdigit():
            raise ValueError("the database (db=) must be a number")
        db = int(query.pop("db"))
    query.pop("db", None)
    tls = {k: query.pop(k) for k in SSL_KEYS if k in query}
    extra = {k: query.pop(k) for k in SENTINEL_KEYS if k in query}
    ssl_args: dict[str, Any] | None = None
    if scheme == "rediss":
        ssl_args = {"ssl_cert_reqs": cert_reqs(tls.pop("ssl_cert_reqs", "required"))}
        ssl_args.update(tls)
    elif tls:
        raise ValueError(f"{', '.join(tls)}: TLS options need a rediss:// URL")
    if scheme == "sentinel":
        if not extra.get("master_name"):
            raise ValueError("a sentinel:// URL needs ?master_name=<the master's name>")
        if query:
            raise ValueError(_not_options(query, "a sentinel:// URL", secret_option))
    elif extra:
        raise ValueError(f"{', '.join(extra)}: for sentinel:// URLs only")
    unknown = sorted(set(query) - _OPTIONS)
    if unknown:
        raise ValueError(_not_options(unknown, "a Redis URL", secret_option))
    return RedisTarget(
        url=url,
        scheme=scheme,
        hosts=tuple(hosts),
        username=username,
        password=password,
        db=db or 0,
        ssl=ssl_args,
        master_name=extra.get("master_name"),
        sentinel_username=extra.get("sentinel_username"),
        sentinel_password=extra.get("sentinel_password"),
        query=query,
    )
