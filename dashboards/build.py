"""Write ``dashboards/generated/<uid>.json`` from the Python sources.

    python -m dashboards.build [--out DIR]        (``make dashboards``)

Each file's ``version`` is derived from its content: the first 8 hex digits of the SHA-256 of
the canonical JSON without ``version``, top bit cleared to fit the signed 32-bit column Grafana
keeps versions in. It is deterministic and changes whenever anything else in the file does
(it is a fingerprint, not a counter: a newer dashboard may have a smaller number).
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.cog.encoder import JSONEncoder

from dashboards import guardrails, overview, slos, workflows

__all__ = ["GENERATED", "MODULES", "content_version", "generate", "render_all"]

GENERATED = Path(__file__).resolve().parent / "generated"
MODULES = (overview, guardrails, workflows, slos)


def content_version(data: dict[str, Any]) -> int:
    """The version of a dashboard's JSON ``data`` (its ``version`` key, if any, ignored)."""
    body = {k: v for k, v in data.items() if k != "version"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return int(hashlib.sha256(canonical.encode()).hexdigest()[:8], 16) & 0x7FFF_FFFF


def render_all() -> dict[str, str]:
    """``{uid: file text}`` of every dashboard."""
    rendered: dict[str, str] = {}
    for module in MODULES:
        data = json.loads(json.dumps(module.build(), cls=JSONEncoder))
        if data["uid"] != module.UID or data["uid"] in rendered:
            raise ValueError(f"{module.__name__}: uid {data['uid']!r} is not its UID or is taken")
        data["version"] = content_version(data)
        rendered[data["uid"]] = json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    return rendered


def generate(out: Path = GENERATED) -> list[Path]:
    """Write every dashboard into ``out`` and delete JSON files there that no source makes."""
    out.mkdir(parents=True, exist_ok=True)
    rendered = render_all()
    written = []
    for uid, text in rendered.items():
        path = out / f"{uid}.json"
        path.write_text(text, encoding="utf-8")
        written.append(path)
    for stale in out.glob("*.json"):
        if stale.stem not in rendered:
            stale.unlink()
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dashboards.build", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=GENERATED, help=f"output directory (default: {GENERATED})")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
