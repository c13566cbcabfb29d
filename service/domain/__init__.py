"""Vigil's bounded contexts, one package each: auth, email, audit, events, workflows, ..."""
