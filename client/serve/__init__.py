"""`pipeq serve`: an HTTP gateway, so any service can submit, follow and receive jobs
without holding Redis credentials (`pip install pipeq[serve]`; docs/http.md).

It is one more producer: it validates and enqueues through `Client`'s own code, waits
and streams with async Redis, and keeps no state of its own outside Redis. It never
imports torch or transformers.
"""

from pipeq.serve._app import create_app
from pipeq.serve._auth import Caller, Keys, hash_key, load_keys, new_key
from pipeq.serve._errors import STATUS, ApiError, error_response
from pipeq.serve._jobs import Gateway, JobView, Settings

__all__ = [
    "STATUS",
    "ApiError",
    "Caller",
    "Gateway",
    "JobView",
    "Keys",
    "Settings",
    "create_app",
    "error_response",
    "hash_key",
    "load_keys",
    "new_key",
]
