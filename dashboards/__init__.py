"""Vigil's Grafana dashboards as code (grafana-foundation-sdk).

One module per dashboard (``overview``, ``guardrails``, ``workflows``, ``slos``), each with a
stable ``UID`` and a ``build()``; ``panels`` holds what they share. ``make dashboards``
(``python -m dashboards.build``) writes ``dashboards/generated/<uid>.json``, which is committed
and provisioned into Grafana; ``tests/ops/test_dashboards.py`` fails when it is stale.
"""
