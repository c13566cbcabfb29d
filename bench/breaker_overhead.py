"""Circuit-breaker overhead: Vigil's breaker against the Python peers, per call, closed state.

Requirement: Vigil's breaker (``async with breaker.guard():``, with a real ``Metrics()`` registry,
so every call updates a prometheus-client counter) costs **<= 2 µs per call** in the closed
state, net of calling the operation bare.

Method: one asyncio event loop (the stdlib one) awaits a trivial ``async def op(): return 1``
``--calls`` times per variant; variants are interleaved within each of ``--runs`` rounds so
machine drift hits them alike, the garbage collector is off while a loop is timed
(``time.perf_counter``), and a variant's figure is its best round minus the best round of its
baseline. Every call succeeds, so each breaker stays closed.

Peers: aiobreaker (``await breaker.call_async(op)``) and purgatory (``async with await
factory.get_breaker("x")``, in-memory unit of work). pybreaker's ``call_async`` needs tornado,
so it is measured through its synchronous ``call`` on a synchronous ``op``, net of calling that
bare: a lower bound for what it would cost on the event loop. A peer that cannot be imported
prints "unavailable" (``pip install -e '.[bench]'`` installs them).

Run: ``.venv/bin/python bench/breaker_overhead.py`` (about a minute). Exit status 1 when Vigil
misses the target.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from service.guardrails.breaker import BreakerConfig, CircuitBreaker
from telemetry.metrics import Metrics

TARGET_US = 2.0
Loop = Callable[[int], Awaitable[None]]


async def op() -> int:
    return 1


def sync_op() -> int:
    return 1


def variants() -> dict[str, tuple[str, Loop | None, str]]:
    """name -> (baseline name, timed loop or None when unavailable, note)."""
    guarded = CircuitBreaker("bench_guard", BreakerConfig(), Metrics())
    called = CircuitBreaker("bench_call", BreakerConfig(), Metrics())
    timed = CircuitBreaker("bench_time", BreakerConfig(window_type="time", window_size=10), Metrics())
    bare = CircuitBreaker("bench_bare", BreakerConfig())

    async def baseline(n: int) -> None:
        for _ in range(n):
            await op()

    async def sync_baseline(n: int) -> None:
        for _ in range(n):
            sync_op()

    def guard_loop(breaker: CircuitBreaker) -> Loop:
        async def loop(n: int) -> None:
            for _ in range(n):
                async with breaker.guard():
                    await op()

        return loop

    async def vigil_call(n: int) -> None:
        for _ in range(n):
            await called.call(op)

    out: dict[str, tuple[str, Loop | None, str]] = {
        "baseline": ("", baseline, "await op()"),
        "sync baseline": ("", sync_baseline, "op() (synchronous)"),
        "vigil guard()": ("baseline", guard_loop(guarded), "count window 100, metrics"),
        "vigil call()": ("baseline", vigil_call, "count window 100, metrics"),
        "vigil guard(), time window": ("baseline", guard_loop(timed), "time window 10 s, metrics"),
        "vigil guard(), no metrics": ("baseline", guard_loop(bare), "count window 100"),
    }
    try:
        import pybreaker

        pyb = pybreaker.CircuitBreaker()

        async def pybreaker_loop(n: int) -> None:
            for _ in range(n):
                pyb.call(sync_op)

        out["pybreaker"] = ("sync baseline", pybreaker_loop, "sync call(); call_async needs tornado")
    except ImportError:
        out["pybreaker"] = ("sync baseline", None, "")
    try:
        import aiobreaker

        aio = aiobreaker.CircuitBreaker()

        async def aiobreaker_loop(n: int) -> None:
            for _ in range(n):
                await aio.call_async(op)

        out["aiobreaker"] = ("baseline", aiobreaker_loop, "await call_async(op)")
    except ImportError:
        out["aiobreaker"] = ("baseline", None, "")
    try:
        import purgatory

        factory = purgatory.AsyncCircuitBreakerFactory()

        async def purgatory_loop(n: int) -> None:
            for _ in range(n):
                async with await factory.get_breaker("x"):
                    await op()

        out["purgatory"] = ("baseline", purgatory_loop, "async with await get_breaker(), in memory")
    except ImportError:
        out["purgatory"] = ("baseline", None, "")
    return out


async def timed(loop: Loop, n: int) -> float:
    """Seconds per call of one round."""
    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter()
        await loop(n)
        return (time.perf_counter() - start) / n
    finally:
        gc.enable()


async def main(calls: int, runs: int) -> int:
    table = variants()
    best: dict[str, float] = {}
    for _, loop, _ in table.values():
        if loop is not None:
            await timed(loop, max(1, calls // 20))  # warm-up
    for _ in range(runs):
        for name, (_, loop, _) in table.items():
            if loop is not None:
                best[name] = min(best.get(name, float("inf")), await timed(loop, calls))
    load = os.getloadavg()[0]
    print(f"{calls} calls x best of {runs} runs, Python {sys.version.split()[0]}, asyncio event loop")
    print(f"load average {load:.2f} on {os.cpu_count()} CPUs (figures are only comparable on an idle machine)")
    print(f"{'variant':28} {'µs/call':>9} {'net µs':>8}  note")
    failed = False
    for name, (base, loop, note) in table.items():
        if loop is None:
            print(f"{name:28} {'unavailable':>9}")
            continue
        per_call = best[name] * 1e6
        net = per_call - best[base] * 1e6 if base else 0.0
        verdict = ""
        if name in ("vigil guard()", "vigil call()"):
            ok = net <= TARGET_US
            failed |= not ok
            verdict = f"  {'PASS' if ok else 'FAIL'} (<= {TARGET_US} µs)"
        net_text = f"{net:8.2f}" if base else f"{'-':>8}"
        print(f"{name:28} {per_call:9.2f} {net_text}  {note}{verdict}")
    return 1 if failed else 0


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--calls", type=int, default=200_000)
    parser.add_argument("--runs", type=int, default=5)
    args: Any = parser.parse_args(argv)
    return asyncio.run(main(args.calls, args.runs))


if __name__ == "__main__":
    sys.exit(cli())
