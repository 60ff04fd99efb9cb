"""The admin API: draft versions, activation and rollback, and the trainer's pause, resume and status.

Every route needs `Authorization: Bearer <token>`: none gives 401, a wrong one 403. Without a
configured token the routes are not mounted at all (404). Versions are those of the draft the
replica serves; activating or rolling back moves the registry's live pointer, and every replica
follows it as it follows a publish.
"""

from __future__ import annotations

import asyncio
import hmac
from dataclasses import asdict
from typing import Protocol

from fastapi import APIRouter, Depends, HTTPException, Request
from pydantic import BaseModel

from store.registry import Registry, UnknownVersionError


class TrainerControl(Protocol):
    """What the admin API drives: the trainer actor's methods (or a `trainer.actor.Trainer`)."""

    def status(self) -> dict: ...

    def pause(self) -> None: ...

    def resume(self) -> None: ...


class Activate(BaseModel):
    version: int


class Rollback(BaseModel):
    to: int | None = None  # None: the live version's parent, or the newest earlier usable one
    reason: str = "rolled back by an operator"


def admin_router(
    token: str, registry: Registry, draft_name: str, domain: str, trainer: TrainerControl | None
) -> APIRouter:
    def authorized(request: Request) -> None:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise HTTPException(
                401, "admin routes need Authorization: Bearer <token>", {"WWW-Authenticate": "Bearer"}
            )
        if not hmac.compare_digest(given.encode(), token.encode()):
            raise HTTPException(403, "wrong admin token")

    router = APIRouter(prefix="/admin", dependencies=[Depends(authorized)])

    def live_or_404(call):
        try:
            return asdict(call())
        except UnknownVersionError as err:
            raise HTTPException(404, str(err)) from err

    @router.get("/versions")
    async def versions() -> dict:
        live = registry.live_version(draft_name, domain)
        stored = registry.versions(draft_name, domain)
        return {"draft": draft_name, "domain": domain, "live": live, "versions": [asdict(v) for v in stored]}

    @router.post("/activate")
    async def activate(body: Activate) -> dict:
        return live_or_404(lambda: registry.promote(draft_name, domain, body.version, event="activate"))

    @router.post("/rollback")
    async def rollback(body: Rollback) -> dict:
        return live_or_404(lambda: registry.rollback(draft_name, domain, body.to, body.reason))

    def control() -> TrainerControl:
        if trainer is None:
            raise HTTPException(404, "no trainer runs with this server")
        return trainer

    @router.get("/trainer")
    async def trainer_status() -> dict:
        return await asyncio.to_thread(control().status)

    @router.post("/trainer/pause")
    async def pause() -> dict:
        await asyncio.to_thread(control().pause)
        return {"paused": True}

    @router.post("/trainer/resume")
    async def resume() -> dict:
        await asyncio.to_thread(control().resume)
        return {"paused": False}

    return router
