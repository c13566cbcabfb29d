"""Operating the dead-letter queues: replay handlers by queue name, and the admin API.

``replay_handler(queue, sessionmaker)`` is what re-writes one entry of a queue (``events``:
the idempotent event insert; ``audit``: the idempotent audit insert; ``patterns``: the user's
analysis handed back to the worker, enqueued now — analyses run only there); the admin API and
``vigil dlq replay`` both use it, so a manual replay writes exactly what the owner's replayer
would. Admin routes (bearer ``VIGIL_ADMIN_TOKEN``, each change audited)::

    GET    /admin/dlq/{queue}?limit=&offset=   entries, oldest first (parked ones included)
    POST   /admin/dlq/{queue}/{id}/replay      write one entry now (parked or not): 200, 404, 409
    DELETE /admin/dlq/{queue}/{id}             discard one entry for good: 204, 404
    POST   /admin/dlq/{queue}/replay           write every entry now, parked ones included

Redis unreachable: 503 + ``Retry-After`` (the queue cannot be read).
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, delete, get, post
from litestar.datastructures import State
from litestar.exceptions import HTTPException, NotFoundException
from litestar.params import FromPath, Parameter
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service.admin import admin_token_guard
from service.clientip import request_ip
from service.guardrails.dlq import DeadLetterQueue, Entry

__all__ = ["REPLAYABLE", "DLQAdminController", "replay_all", "replay_handler", "run_cli"]

Handler = Callable[[Any], Awaitable[object]]
REPLAYABLE = ("audit", "events", "patterns")


def replay_handler(queue: str, sessionmaker: async_sessionmaker[AsyncSession], **options: Any) -> Handler:
    """The handler that writes one payload of ``queue``; ``KeyError`` for an unknown queue.
    ``options`` go to the queue's replayer (``on_stored`` for events; ``saq_queue``, the SAQ queue,
    for patterns)."""
    if queue == "events":
        from service.domain.events.replay import EventReplayer

        return EventReplayer(sessionmaker, **options).handle
    if queue == "audit":
        return _audit_handler(sessionmaker)
    if queue == "patterns":
        return _patterns_handler(options["saq_queue"])
    raise KeyError(queue)


def _patterns_handler(saq_queue: Any) -> Handler:
    from service.domain.patterns.trigger import enqueue_analysis

    async def handle(payload: Any) -> None:
        # Both kinds of entry (an analysis that failed, an enqueue that failed) mean "analyse this
        # user": the analysis is recomputed from the events, so running it again is harmless.
        await enqueue_analysis(saq_queue, uuid.UUID(payload["user_id"]), debounce_seconds=0)

    return handle


def _audit_handler(sessionmaker: async_sessionmaker[AsyncSession]) -> Handler:
    from service.db.models import AuditLogEntry
    from service.domain.audit.recorder import AuditEntry

    async def handle(payload: Any) -> None:
        row = msgspec.convert(payload, AuditEntry).row()
        stmt = insert(AuditLogEntry).values([row]).on_conflict_do_nothing(index_elements=[AuditLogEntry.entry_id])
        async with sessionmaker() as session:
            await session.execute(stmt)
            await session.commit()

    return handle


async def replay_all(dlq: DeadLetterQueue, handler: Handler, limit: int = 10_000) -> dict[str, int]:
    """Write up to ``limit`` entries now, parked ones included, oldest first; a failing entry
    counts an attempt and stays. Returns ``{"replayed": n, "failed": m}``."""
    replayed = failed = 0
    offset = 0
    while replayed + failed < limit:
        page = await dlq.list(limit=min(500, limit - replayed - failed), offset=offset)
        if not page:
            break
        for entry in page:
            try:
                ok = await dlq.replay_one(entry.id, handler)
            except Exception:
                failed += 1
                offset += 1  # it stays in the queue: step over it
            else:
                replayed += int(ok)
    return {"replayed": replayed, "failed": failed}


class DLQPage(msgspec.Struct):
    queue: str
    depth: int
    entries: list[Entry]


def _queue(state: State, name: str) -> DeadLetterQueue:
    queues: dict[str, DeadLetterQueue] = state.vigil.extensions.get("dlq", {})
    if name not in queues:
        raise NotFoundException(f"No dead-letter queue named {name!r} (known: {', '.join(sorted(queues))}).")
    return queues[name]


def _handler(state: State, name: str) -> Handler:
    options: dict[str, Any] = {}
    if name == "events":
        options["on_stored"] = state.vigil.extensions["events"].on_replayed
    if name == "patterns":
        options["saq_queue"] = state.vigil.extensions["queue"]
    return replay_handler(name, state.vigil.sessionmaker, **options)


def _audit(request: Request[Any, Any, Any], state: State, action: str, target: str, **details: Any) -> None:
    audit = state.vigil.extensions.get("audit")
    if audit is not None:
        ip = request_ip(request.scope, state.vigil.settings.trusted_proxies)
        audit.record(action, actor_user_id=None, target_type="dlq_entry", target_id=target, details=details, ip=ip)


class DLQAdminController(Controller):
    path = "/admin/dlq"
    guards = [admin_token_guard]
    tags = ["admin"]

    @get("/{queue:str}")
    async def list_entries(
        self,
        state: State,
        queue: FromPath[str],
        limit: Annotated[int, Parameter(ge=1, le=1000)] = 100,
        offset: Annotated[int, Parameter(ge=0, le=1_000_000)] = 0,
    ) -> DLQPage:
        """Entries of one queue, oldest first, with attempts, last error and first-seen time."""
        dlq = _queue(state, queue)
        entries = await dlq.list(limit=limit, offset=offset)
        return DLQPage(queue=queue, depth=dlq.current_depth(), entries=entries)

    @post("/{queue:str}/{entry_id:str}/replay", status_code=200)
    async def replay_entry(
        self, request: Request[Any, Any, Any], state: State, queue: FromPath[str], entry_id: FromPath[str]
    ) -> dict[str, Any]:
        """Write one entry now (parked or not); on failure it stays, with the attempt counted."""
        dlq = _queue(state, queue)
        try:
            found = await dlq.replay_one(entry_id, _handler(state, queue))
        except HTTPException:
            raise
        except Exception as exc:
            _audit(request, state, "admin.dlq_replay", f"{queue}/{entry_id}", outcome="failed")
            raise HTTPException(
                status_code=409, detail=f"Replay of {entry_id} failed: {type(exc).__name__}; the entry stays queued."
            ) from exc
        if not found:
            raise NotFoundException(f"No entry {entry_id!r} in the {queue} dead-letter queue.")
        _audit(request, state, "admin.dlq_replay", f"{queue}/{entry_id}", outcome="replayed")
        return {"queue": queue, "id": entry_id, "replayed": True}

    @delete("/{queue:str}/{entry_id:str}", status_code=204)
    async def discard_entry(
        self, request: Request[Any, Any, Any], state: State, queue: FromPath[str], entry_id: FromPath[str]
    ) -> None:
        """Delete one entry for good (an operator's decision)."""
        dlq = _queue(state, queue)
        if not await dlq.discard(entry_id):
            raise NotFoundException(f"No entry {entry_id!r} in the {queue} dead-letter queue.")
        _audit(request, state, "admin.dlq_discard", f"{queue}/{entry_id}")

    @post("/{queue:str}/replay", status_code=200)
    async def replay_queue(
        self,
        request: Request[Any, Any, Any],
        state: State,
        queue: FromPath[str],
        limit: Annotated[int, Parameter(ge=1, le=100_000)] = 10_000,
    ) -> dict[str, Any]:
        """Write every entry now (up to ``limit``), parked ones included."""
        dlq = _queue(state, queue)
        report = await replay_all(dlq, _handler(state, queue), limit)
        _audit(request, state, "admin.dlq_replay_all", queue, **report)
        return {"queue": queue, **report, "depth": dlq.current_depth()}


# --- ``vigil dlq`` ---------------------------------------------------------------------------


async def run_cli(command: str, queue: str, entry_id: str | None, *, redis_url: str, database_url: str,
                  spool_dir: Any) -> tuple[int, dict[str, Any]]:  # fmt: skip
    """``vigil dlq list|replay|discard``: (exit code, JSON answer). Exit 1: no such entry, or
    its replay failed (the entry stays, its attempt counted)."""
    import redis.asyncio as aioredis
    from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

    if queue not in REPLAYABLE:
        return 1, {"error": f"unknown queue {queue!r}; known: {', '.join(REPLAYABLE)}"}
    redis = aioredis.from_url(redis_url, socket_timeout=5, socket_connect_timeout=5)
    engine = create_async_engine(database_url)
    options: dict[str, Any] = {}
    try:
        dlq = DeadLetterQueue(queue, redis, spool_dir)
        if command == "list":
            entries = await dlq.list(limit=1000)
            return 0, {"queue": queue, "depth": dlq.current_depth(), "entries": msgspec.to_builtins(entries)}
        if command == "discard":
            assert entry_id is not None
            found = await dlq.discard(entry_id)
            return (0 if found else 1), {"queue": queue, "id": entry_id, "discarded": found}
        if queue == "patterns":
            from service.worker.queue import create_queue

            options["saq_queue"] = saq_queue = create_queue(redis_url)
            await saq_queue.connect()
        handler = replay_handler(queue, async_sessionmaker(engine), **options)
        if entry_id is None:
            report = await replay_all(dlq, handler)
            return 0, {"queue": queue, **report, "depth": dlq.current_depth()}
        try:
            found = await dlq.replay_one(entry_id, handler)
        except Exception as exc:
            return 1, {"queue": queue, "id": entry_id, "replayed": False, "error": f"{type(exc).__name__}: {exc}"}
        return (0 if found else 1), {"queue": queue, "id": entry_id, "replayed": found}
    finally:
        if "saq_queue" in options:
            await options["saq_queue"].disconnect()
        await redis.aclose()
        await engine.dispose()
