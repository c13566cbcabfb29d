"""Guardrails, one module each, named as in the metric catalogue, dashboards, alerts and runbooks."""
