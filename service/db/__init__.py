"""Data layer: the async engine and its instrumented pool, sessions and the ORM models."""
