"""Vigil's alerting as code: guardrail alerts (``rules.py``), SLOs (``slos.yaml``, ``slo.py``),
the generator of ``generated/*.yml`` (``generate.py``), promtool tests (``tests/``) and the
Alertmanager configuration with its route cases. README "Adding an alert" walks through it."""
