"""The ``vigil`` command.

    vigil run                     serve the API (embedded PostgreSQL + Redis when no URLs are set,
                                  and then the background worker in the same process)
    vigil worker                  run the background worker (SAQ), with /metrics on its own port
    vigil db upgrade [REV]        apply migrations (default: head)
    vigil db downgrade REV        revert migrations (``-1``, ``base`` or a revision id)
    vigil db current              print the database's revision, head and drift
    vigil breaker list            print the operator overrides in force (all instances)
    vigil breaker set NAME STATE  forced_open, disabled or auto, applied by every instance
    vigil settings FORMAT         print the documented settings (env-example or markdown)
    vigil dlq list|replay|discard --queue NAME [ID]
                                  dead-letter entries (audit, events): list, write now, delete
    vigil keys generate [--kid K] print a new credential key entry for VIGIL_CREDENTIAL_KEYS
    vigil keys rotate             re-seal integration credentials under the primary (first) key

Exit codes: 0 success, 2 refused configuration (one line on stderr naming the setting),
3 the server failed to start, 128 + N stopped by signal N (130 for Ctrl-C, 143 for SIGTERM).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import sys
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from service.settings import Settings, SettingsError

if TYPE_CHECKING:
    import uvicorn

__all__ = ["main"]

STATE_FILE = "embedded.json"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def _running_embedded(settings: Settings) -> dict[str, str] | None:
    """URLs of the embedded servers a live ``vigil run`` started under ``data_dir``."""
    path = settings.data_dir / STATE_FILE
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return state if _pid_alive(int(state.get("pid", 0))) else None


@contextlib.contextmanager
def embedded_servers(settings: Settings, announce: bool = True) -> Iterator[Settings]:
    """Start the embedded servers the settings leave unset; yield settings with their URLs."""
    from service.embedded import EmbeddedPostgres, EmbeddedRedis

    data_dir = settings.data_dir.resolve()
    started: list[EmbeddedPostgres | EmbeddedRedis] = []
    resolved = settings
    try:
        if not settings.database_url:
            pg = EmbeddedPostgres(data_dir / "postgres")
            pg.start()
            started.append(pg)
            resolved = dataclasses.replace(resolved, database_url=pg.url())
        if not settings.redis_url:
            rd = EmbeddedRedis(data_dir / "redis")
            rd.start()
            started.append(rd)
            resolved = dataclasses.replace(resolved, redis_url=rd.url())
        if started:
            state = {"pid": os.getpid(), "database_url": resolved.database_url, "redis_url": resolved.redis_url}
            (data_dir / STATE_FILE).write_text(json.dumps(state))
            if announce:
                print(
                    f"vigil: embedded servers under {data_dir}: {', '.join(s.name for s in started)}", file=sys.stderr
                )
        yield resolved
    finally:
        for server in reversed(started):
            server.stop()
        with contextlib.suppress(OSError):
            if started:
                (data_dir / STATE_FILE).unlink()


def _database_url(settings: Settings, stack: contextlib.ExitStack) -> str:
    if settings.database_url:
        return settings.database_url
    running = _running_embedded(settings)
    if running:
        return running["database_url"]
    return stack.enter_context(embedded_servers(dataclasses.replace(settings, redis_url="unused"))).database_url


def cmd_run(settings: Settings, args: argparse.Namespace) -> int:
    import uvicorn

    from service.app import create_app
    from service.db import migrate

    settings.enforce()  # refuse before starting anything
    host = args.host or settings.host
    port = args.port or settings.port
    with embedded_servers(settings) as resolved:
        if settings.embedded and not settings.database_url:
            migrate.upgrade(resolved.database_url)
        app = create_app(resolved)
        # proxy_headers off: X-Forwarded-For is believed only through VIGIL_TRUSTED_PROXIES
        # (service.clientip), never by uvicorn's own defaults.
        config = uvicorn.Config(
            app, host=host, port=port, log_config=None, access_log=False, lifespan="on", proxy_headers=False
        )
        if settings.embedded:
            print(f"vigil: serving on http://{host}:{port} with the worker in-process", file=sys.stderr)
            return asyncio.run(_serve_with_worker(config, resolved))
        server = uvicorn.Server(config)
        print(f"vigil: serving on http://{host}:{port}", file=sys.stderr)
        server.run()
        return 0 if server.started else 3


async def _serve_with_worker(config: uvicorn.Config, settings: Settings) -> int:
    """The API and the worker in one event loop (the embedded default). The first SIGINT or
    SIGTERM stops the API, then the worker (running jobs finish); a second one hurries both."""
    import uvicorn

    from service.worker.app import WorkerOptions, WorkerRuntime

    class Server(uvicorn.Server):
        # uvicorn re-raises the signal once it has stopped, which would cut the worker's stop short.
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    server = Server(config)
    runtime = WorkerRuntime(settings, WorkerOptions(metrics_required=False))
    received: list[int] = []

    def on_signal(sig: int) -> None:
        received.append(sig)
        server.handle_exit(sig, None)
        if len(received) > 1:
            runtime.force_stop()

    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        async with runtime:
            try:
                await server.serve()
            except SystemExit:  # uvicorn's way of saying it could not bind
                return 3
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
    if received:
        return 128 + received[0]
    return 0 if server.started else 3


def _resolved_for_worker(settings: Settings) -> Settings:
    """Settings with both URLs: from the environment, else those of a running embedded `vigil run`."""
    if settings.database_url and settings.redis_url:
        return settings
    running = _running_embedded(settings)
    if running is None:
        raise SettingsError(
            "VIGIL_DATABASE_URL or VIGIL_REDIS_URL is empty and no embedded `vigil run` is running under "
            "VIGIL_DATA_DIR (on the embedded default, `vigil run` already runs the worker)"
        )
    return dataclasses.replace(
        settings,
        database_url=settings.database_url or running["database_url"],
        redis_url=settings.redis_url or running["redis_url"],
    )


def cmd_worker(settings: Settings, args: argparse.Namespace) -> int:
    from service.worker.app import WorkerOptions, run_worker

    settings.enforce()  # refuse before starting anything
    options = WorkerOptions(metrics_port=args.metrics_port)
    return run_worker(_resolved_for_worker(settings), options)


def cmd_db(settings: Settings, args: argparse.Namespace) -> int:
    from service.db import migrate

    with contextlib.ExitStack() as stack:
        url = _database_url(settings, stack)
        if args.db_command == "upgrade":
            migrate.upgrade(url, args.revision)
        elif args.db_command == "downgrade":
            migrate.downgrade(url, args.revision)
        cur = migrate.current(url)
        print(json.dumps({"current": cur, "head": migrate.head(), "drift": migrate.drift(cur)}))
    return 0


def _redis_url(settings: Settings) -> str:
    if settings.redis_url:
        return settings.redis_url
    running = _running_embedded(settings)
    if running:
        return running["redis_url"]
    raise SettingsError("VIGIL_REDIS_URL is empty and no embedded `vigil run` is running under VIGIL_DATA_DIR")


def cmd_breaker(settings: Settings, args: argparse.Namespace) -> int:
    import asyncio

    import redis.asyncio as aioredis

    from service.guardrails.breaker_admin import OVERRIDE_KEY, as_text

    async def go() -> dict[str, str]:
        client = aioredis.from_url(_redis_url(settings), socket_timeout=2, socket_connect_timeout=2)
        try:
            if args.breaker_command == "set":
                if args.state == "auto":
                    await client.hdel(OVERRIDE_KEY, args.name)
                else:
                    await client.hset(OVERRIDE_KEY, args.name, args.state)
            raw = await client.hgetall(OVERRIDE_KEY)
            return {as_text(k): as_text(v) for k, v in raw.items()}
        finally:
            await client.aclose()

    print(json.dumps({"overrides": asyncio.run(go())}))
    return 0


def cmd_keys(settings: Settings, args: argparse.Namespace) -> int:
    """``vigil keys generate|rotate`` (integration credential keys, D40)."""
    from service.domain.integrations.keyring import Keyring, generate_key_line

    if args.keys_command == "generate":
        print(generate_key_line(args.kid))
        return 0
    from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

    from service.domain.integrations.rotation import rotate_credentials

    keyring = Keyring.from_settings(settings)

    async def go(url: str) -> dict[str, object]:
        engine = create_async_engine(url)
        try:
            report = await rotate_credentials(async_sessionmaker(engine), keyring, args.batch_size)
        finally:
            await engine.dispose()
        return dataclasses.asdict(report)

    with contextlib.ExitStack() as stack:
        report = asyncio.run(go(_database_url(settings, stack)))
    print(json.dumps(report))
    return 0 if report["unreadable"] == 0 else 1


def cmd_dlq(settings: Settings, args: argparse.Namespace) -> int:
    """``vigil dlq list|replay|discard --queue NAME [ID]`` (see ``service.dlq_admin``)."""
    from service.dlq_admin import run_cli

    with contextlib.ExitStack() as stack:
        code, answer = asyncio.run(
            run_cli(args.dlq_command, args.queue, getattr(args, "id", None), redis_url=_redis_url(settings),
                    database_url=_database_url(settings, stack), spool_dir=settings.dlq_spool_dir)
        )  # fmt: skip
    print(json.dumps(answer, default=str))
    return code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vigil", description="Vigil automation API")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="serve the API")
    run.add_argument("--host", default=None)
    run.add_argument("--port", type=int, default=None)
    wk = sub.add_parser("worker", help="run the background worker")
    wk.add_argument("--metrics-port", type=int, default=None, help="default: VIGIL_WORKER_METRICS_PORT; 0 disables")
    db = sub.add_parser("db", help="database migrations")
    dbsub = db.add_subparsers(dest="db_command", required=True)
    up = dbsub.add_parser("upgrade", help="apply migrations")
    up.add_argument("revision", nargs="?", default="head")
    down = dbsub.add_parser("downgrade", help="revert migrations")
    down.add_argument("revision")
    dbsub.add_parser("current", help="show revision and drift")
    br = sub.add_parser("breaker", help="circuit breaker overrides")
    brsub = br.add_subparsers(dest="breaker_command", required=True)
    brsub.add_parser("list", help="print the overrides in force")
    brset = brsub.add_parser("set", help="override a breaker on every instance")
    brset.add_argument("name", help="breaker name, e.g. database")
    brset.add_argument("state", choices=["forced_open", "disabled", "auto"])
    keys = sub.add_parser("keys", help="integration credential keys")
    keysub = keys.add_subparsers(dest="keys_command", required=True)
    gen = keysub.add_parser("generate", help="print a new kid:base64key entry")
    gen.add_argument("--kid", default=None, help="key id (default: random)")
    rot = keysub.add_parser("rotate", help="re-seal every credential under the primary key")
    rot.add_argument("--batch-size", type=int, default=100)
    dq = sub.add_parser("dlq", help="dead-letter queue entries")
    dqsub = dq.add_subparsers(dest="dlq_command", required=True)
    for name, id_help in (("list", None), ("replay", "one entry; all when omitted"), ("discard", "the entry")):
        one = dqsub.add_parser(name, help=f"{name} dead-letter entries")
        one.add_argument("--queue", required=True, help="audit or events")
        if id_help:
            one.add_argument("id", nargs="?" if name == "replay" else None, default=None, help=id_help)
    st = sub.add_parser("settings", help="print the documented settings")
    st.add_argument("format", choices=["env-example", "markdown"])
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "settings":
            from service.settings_doc import env_example, markdown_table

            print(env_example() if args.format == "env-example" else markdown_table())
            return 0
        settings = Settings.from_env()
        if args.command == "run":
            return cmd_run(settings, args)
        if args.command == "worker":
            return cmd_worker(settings, args)
        if args.command == "breaker":
            return cmd_breaker(settings, args)
        if args.command == "dlq":
            return cmd_dlq(settings, args)
        if args.command == "keys":
            return cmd_keys(settings, args)
        return cmd_db(settings, args)
    except SettingsError as exc:
        print(f"vigil: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
