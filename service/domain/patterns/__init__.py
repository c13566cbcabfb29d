"""Pattern analysis: a debounced background analysis of each user's events after ingestion
(time-of-day habits and A->B sequences, in SQL), stored as ``patterns`` with support and
confidence; strong ones become workflow ``suggestions`` the user accepts or dismisses.

- :mod:`.detect`: the detectors; :mod:`.analysis`: one analysis (upsert, suggestions).
- :mod:`.suggest`: the workflow proposed for a pattern.
- :mod:`.trigger`: the events listener (API side); :mod:`.jobs`: the worker's job set.
- :mod:`.routes`, :mod:`.component`: the API.
"""
