"""Operations: `/health` (the process answers), `/ready` (Redis answers), `/ready/{m}`
(the deployment has a live worker), `/metrics` (the gateway's own, for Prometheus)."""

from __future__ import annotations

import asyncio

import redis
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from pipeq.serve._app import GatewayDep
from pipeq.serve._errors import ApiError
from pipeq.serve._jobs import Gateway, Hub

router = APIRouter(tags=["operations"])


@router.get("/health", summary="The gateway process answers")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/ready", summary="Redis answers")
async def ready(gw: Gateway = GatewayDep) -> dict[str, object]:
    """200 while the default Redis (the gateway's own state) answers; with several, the
    deployments whose Redis does not answer are listed in `unavailable` (their requests
    get 503; the others are served)."""

    async def answers(hub: Hub) -> BaseException | None:
        try:
            await gw.bounded(hub.aredis.ping())
        except (redis.RedisError, OSError) as e:
            return e
        return None

    hubs = list(gw.hubs.values())
    errors = dict(zip(hubs, await asyncio.gather(*map(answers, hubs)), strict=True))
    if errors[gw.home] is not None:
        raise ApiError(
            503,
            "BrokerUnavailable",
            f"Redis did not answer ({type(errors[gw.home]).__name__})",
            retry_after_s=5,
        )
    down = {hub.url for hub, e in errors.items() if e is not None}
    if not down:
        return {"status": "ready"}
    routes = gw.client.routes
    return {"status": "ready", "unavailable": sorted(n for n, u in routes.items() if u in down)}


@router.get("/ready/{m:path}", summary="The deployment (or task) has a live worker")
async def ready_deployment(m: str, gw: Gateway = GatewayDep) -> Response:
    client = gw.client

    def check() -> dict[str, object]:
        found = client.resolve(m)  # UnknownDeployment 404, NoLiveWorker 503
        broker = client.broker(found.name)
        live = broker.call(broker.registry.live_workers, found.name)
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
