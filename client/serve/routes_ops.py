"""Operations: `/health` (the process answers), `/ready` (Redis answers), `/ready/{m}`
(the deployment has a live worker), `/metrics` (the gateway's own, for Prometheus)."""

from __future__ import annotations

import redis
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from pipeq.serve._app import GatewayDep
from pipeq.serve._errors import ApiError
from pipeq.serve._jobs import Gateway

router = APIRouter(tags=["operations"])


@router.get("/health", summary="The gateway process answers")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/ready", summary="Redis answers")
async def ready(gw: Gateway = GatewayDep) -> dict[str, str]:
    try:
        await gw.aredis.ping()
    except (redis.RedisError, OSError) as e:
        raise ApiError(
            503, "BrokerUnavailable", f"Redis did not answer ({type(e).__name__})", retry_after_s=5
        ) from None
    return {"status": "ready"}


@router.get("/ready/{m:path}", summary="The deployment (or task) has a live worker")
async def ready_deployment(m: str, gw: Gateway = GatewayDep) -> Response:
    client = gw.client

    def check() -> dict[str, object]:
        found = client.resolve(m)  # UnknownDeployment 404, NoLiveWorker 503
        live = client.call(client.registry.live_workers, found.name)
        if not live:
            raise ApiError(
                503,
                "NoLiveWorker",
                "no live worker now (jobs still wait for one within the grace period)",
                deployment=found.name,
                retry_after_s=5,
            )
        return {"status": "ready", "deployment": found.name, "live_workers": len(live)}

    return JSONResponse(await gw.in_thread(check))


@router.get("/metrics", summary="Prometheus metrics of this gateway process")
async def metrics(request: Request) -> Response:
    body = generate_latest(request.app.state.metrics.registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


__all__ = ["router"]
