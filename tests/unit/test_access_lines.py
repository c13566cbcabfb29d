"""Access lines are written in batches, never lost at shutdown, and never wait long."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from telemetry.logging import AccessLines


def test_with_interval_zero_each_line_is_written_at_once(capsys: Any) -> None:
    """``interval`` 0: every line reaches standard output as it is added."""
    lines = AccessLines(interval=0)
    lines.add(b'{"n":1}\n')
    assert capsys.readouterr().out == '{"n":1}\n'


def test_lines_wait_for_the_interval_or_the_batch_size_and_keep_their_order(capsys: Any) -> None:
    """Lines added within the interval wait in memory; the ``max_lines``-th line writes the
    whole batch at once, in order; :meth:`flush` writes what is left."""
    lines = AccessLines(interval=60, max_lines=3)
    lines.add(b"1\n")
    lines.add(b"2\n")
    assert capsys.readouterr().out == ""
    lines.add(b"3\n")
    assert capsys.readouterr().out == "1\n2\n3\n"
    lines.add(b"4\n")
    assert capsys.readouterr().out == ""
    lines.flush()
    assert capsys.readouterr().out == "4\n"


async def test_the_periodic_task_writes_waiting_lines_while_idle_and_at_cancellation(capsys: Any) -> None:
    """With no further request, :meth:`run` writes waiting lines within one interval; cancelling
    it (application shutdown) writes the rest."""
    lines = AccessLines(interval=0.2)
    task = asyncio.create_task(lines.run())
    lines.add(b"idle\n")
    assert capsys.readouterr().out == ""
    await asyncio.sleep(0.35)
    assert capsys.readouterr().out == "idle\n"
    lines.interval = 60  # from the task's next round on; this line waits for shutdown
    lines.add(b"last\n")
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert capsys.readouterr().out == "last\n"
