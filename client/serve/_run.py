"""`pipeq serve`: run the gateway on uvicorn."""

from __future__ import annotations

import logging
import resource
import sys

from pipeq._config import load_deployments
from pipeq._stack import is_loopback
from pipeq.serve._auth import hash_key, load_keys, new_key
from pipeq.serve._jobs import Settings
from pipeq.serve._webhooks import load_webhooks

__all__ = ["check_exposure", "key_stanza", "serve"]


class Unprotected(ValueError):
    """The gateway would answer beyond this host with no API key."""


def check_exposure(address: str, settings: Settings) -> None:
    """Unprotected for a non-loopback address without keys (as Flower's rule)."""
    if settings.keys is None and not is_loopback(address):
        raise Unprotected(
            f"the gateway would listen on {address or 'every address'!r} with no API key: "
            "give --keys FILE (or $PIPEQ_API_KEYS_FILE), or --address 127.0.0.1"
        )


def key_stanza(name: str, deployments: list[str]) -> tuple[str, str]:
    """A new key and its TOML entry for the keys file (only the hash is kept)."""
    key = new_key()
    listed = ", ".join(f'"{d}"' for d in deployments or ["*"])
    return key, f'[keys.{name}]\nsha256 = "{hash_key(key)}"\ndeployments = [{listed}]\n'


def serve(settings: Settings, address: str, port: int, log_level: str = "info") -> None:
    """Run until SIGINT/SIGTERM. Raises Unprotected (before listening) where
    `check_exposure` does."""
    import uvicorn

    from pipeq.serve._app import create_app

    check_exposure(address, settings)
    # each open stream or wait is a socket: as many as the hard limit allows
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    logging.basicConfig(level=log_level.upper(), stream=sys.stderr, format="%(message)s")
    uvicorn.run(
        create_app(settings),
        host=address.strip("[]"),
        port=port,
        log_level=log_level,
        access_log=False,  # ours: without bodies or keys, with the caller's name
        timeout_graceful_shutdown=5,
        backlog=4096,
    )


def settings_from(
    redis_url: str | None,
    keys_file: str | None,
    max_body_bytes: int | None,
    webhooks_file: str | None = None,
    config: str | None = None,
) -> Settings:
    return Settings(
        redis_url=redis_url,
        # read now: a config it cannot use stops `pipeq serve` before it listens (exit 2)
        config=load_deployments(config) if config else None,
        keys=load_keys(keys_file),
        max_body_bytes=max_body_bytes,
        webhooks=load_webhooks(webhooks_file),
    )
