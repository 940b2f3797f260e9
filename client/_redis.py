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

import ssl
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

import redis
import redis.sentinel

__all__ = ["RedisTarget", "masked", "parse"]

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


def masked(url: str) -> str:
    """The URL with every password in it (one per `;`-separated host, and a
    `sentinel_password`) replaced by ***."""
    out = []
    for chunk in url.split(";"):
        try:
            parts = urlsplit(chunk)
            password = parts.password
            hostname, port = parts.hostname, parts.port
        except ValueError:  # not a URL we can take apart: hide everything after the scheme
            scheme, sep, _ = chunk.partition("://")
            out.append(f"{scheme}{sep}***" if sep else "***")
            continue
        netloc = parts.netloc
        if password is not None:
            netloc = _netloc(hostname or "", port, parts.username, "***").replace("%2A", "*")
        query = parts.query
        if query:
            pairs = parse_qsl(query, keep_blank_values=True)
            query = "&".join(
                f"{k}={'***' if 'password' in k.lower() else quote(v, safe='/:,')}"
                for k, v in pairs
            )
        out.append(urlunsplit(parts._replace(netloc=netloc, query=query)))
    return ";".join(out)


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
            manager = redis.sentinel.Sentinel(  # type: ignore[no-untyped-call]
                list(self.hosts), sentinel_kwargs=self.sentinel_kwargs(**socket)
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


def _port(parts: Any, default: int) -> int:
    port = parts.port  # ValueError for a port out of range or not a number
    return int(port) if port is not None else default


def parse(url: str) -> RedisTarget:
    """The URL taken apart; ValueError (without the password) when it cannot be used."""
    scheme = url.partition("://")[0].lower()
    if scheme not in ("redis", "rediss", "sentinel"):
        if scheme not in ("unix",):
            raise ValueError("a Redis URL starts with redis://, rediss://, sentinel:// or unix://")
        return RedisTarget(url=url, scheme=scheme)
    chunks = url.split(";")
    if scheme != "sentinel" and len(chunks) > 1:
        raise ValueError("several hosts (';') are for sentinel:// URLs only")
    hosts: list[tuple[str, int]] = []
    username = password = None
    db: int | None = None
    query: dict[str, str] = {}
    for chunk in chunks:
        parts = urlsplit(chunk.strip())
        if parts.scheme.lower() != scheme:
            raise ValueError(f"every host of the URL must be {scheme}://")
        hosts.append(
            (
                parts.hostname or "127.0.0.1",
                _port(parts, SENTINEL_PORT if scheme == "sentinel" else 6379),
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
                raise ValueError(f"the database must be a number, not {path!r}") from None
        query.update(dict(parse_qsl(parts.query)))
    if "db" in query and db is None:
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
            raise ValueError(f"{', '.join(query)}: not an option of a sentinel:// URL")
    elif extra:
        raise ValueError(f"{', '.join(extra)}: for sentinel:// URLs only")
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
