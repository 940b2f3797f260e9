"""Hugging Face's inference format: `POST /models/{m}` (what `InferenceClient` and
`@huggingface/inference` send), text-generation as TGI answers it.

Placeholder: filled on branch i19-hf (scope point 2 of issue 19). Use
`pipeq.serve._app.CallerDep` / `GatewayDep`, `Gateway.submit` and `Gateway.wait` for
the job, and `pipeq.serve._errors.error_response(exc, HF_STATUS)` for errors (424 for a
job that failed, as TGI answers).
"""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(tags=["hugging face"])

__all__ = ["router"]
