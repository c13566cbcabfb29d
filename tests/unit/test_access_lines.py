"""Access lines are written in batches, never lost at shutdown, and never wait long."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
from typing import Any

from telemetry.logging import AccessLine, AccessLines


def fields(n: int | str) -> AccessLine:
    """An access line as ``HttpTelemetry`` hands it over (``timestamp`` a float), ``n`` its path."""
    return AccessLine("GET", "/r/{n}", f"/r/{n}", 200, 1.25, "http_request", "info", "rid", "t" * 32, "s" * 16, 1.5)


def text(*ns: int | str) -> str:
    """What those lines look like on standard output: one JSON object per line, with the keys
    of structlog's renderer in order and the timestamp as structlog writes it."""
    stamp = "1970-01-01T00:00:01.500000Z"
    return "".join(
        json.dumps(
            {
                "method": "GET", "route": "/r/{n}", "path": f"/r/{n}", "status": 200, "duration_ms": 1.25,
                "event": "http_request", "level": "info", "request_id": "rid", "trace_id": "t" * 32,
                "span_id": "s" * 16, "timestamp": stamp,
            },
            separators=(",", ":"),
        )
        + "\n"
        for n in ns
    )  # fmt: skip


def test_lines_are_not_tracked_by_the_garbage_collector(capsys: Any) -> None:
    """An access line is invisible to the garbage collector (D74): lines waiting for a flush
    are never walked by a collection, before or after the flush puts a datetime in them."""
    line = fields(1)
    lines = AccessLines(interval=3600)
    lines.add(line)
    assert not gc.is_tracked(line)
    lines.flush()
    assert capsys.readouterr().out == text(1)
    assert not gc.is_tracked(line)


def test_with_interval_zero_each_line_is_written_at_once(capsys: Any) -> None:
    """``interval`` 0: every line reaches standard output as it is added."""
    lines = AccessLines(interval=0)
    lines.add(fields(1))
    assert capsys.readouterr().out == text(1)


def test_lines_wait_for_the_interval_or_the_batch_size_and_keep_their_order(capsys: Any) -> None:
    """Lines added within the interval wait in memory; the ``max_lines``-th line writes the
    whole batch at once, in order; :meth:`flush` writes what is left."""
    lines = AccessLines(interval=60, max_lines=3)
    lines.add(fields(1))
    lines.add(fields(2))
    assert capsys.readouterr().out == ""
    lines.add(fields(3))
    assert capsys.readouterr().out == text(1, 2, 3)
    lines.add(fields(4))
    assert capsys.readouterr().out == ""
    lines.flush()
    assert capsys.readouterr().out == text(4)


async def test_the_periodic_task_writes_waiting_lines_while_idle_and_at_cancellation(capsys: Any) -> None:
    """With no further request, :meth:`run` writes waiting lines within one interval; cancelling
    it (application shutdown) writes the rest."""
    lines = AccessLines(interval=0.2)
    task = asyncio.create_task(lines.run())
    lines.add(fields("idle"))
    assert capsys.readouterr().out == ""
    await asyncio.sleep(0.35)
    assert capsys.readouterr().out == text("idle")
    lines.interval = 60  # from the task's next round on; this line waits for shutdown
    lines.add(fields("last"))
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert capsys.readouterr().out == text("last")


def test_timestamps_are_written_as_structlog_writes_them(capsys: Any) -> None:
    """Each line's ``time.time()`` becomes the UTC ISO time structlog's ``TimeStamper`` writes:
    microseconds, no fraction on a whole second, ``Z``."""
    lines = AccessLines(interval=60)
    for stamp in (0.0, 1.5, 1_764_460_800.0, 1_764_460_800.25):
        line = fields(1)
        line.timestamp = stamp
        lines.add(line)
    lines.flush()
    written = [json.loads(line)["timestamp"] for line in capsys.readouterr().out.splitlines()]
    assert written == [
        "1970-01-01T00:00:00Z", "1970-01-01T00:00:01.500000Z", "2025-11-30T00:00:00Z", "2025-11-30T00:00:00.250000Z",
    ]  # fmt: skip


async def test_while_the_flush_task_runs_add_leaves_the_clock_to_it(capsys: Any) -> None:
    """With the periodic task running, :meth:`add` does not read the clock: a line added long
    after the last write waits for the task's next round; once the task is cancelled, ``add``
    checks the clock again and writes such a line at once."""
    lines = AccessLines(interval=0.3)
    task = asyncio.create_task(lines.run())
    await asyncio.sleep(0)  # the task starts
    lines._last -= 60  # the last write was long ago
    lines.add(fields("timed"))
    assert capsys.readouterr().out == ""
    await asyncio.sleep(0.45)
    assert capsys.readouterr().out == text("timed")
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    lines._last -= 60
    lines.add(fields("untimed"))
    assert capsys.readouterr().out == text("untimed")
