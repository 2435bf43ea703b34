"""Search: study files, spaces and narrowing, samplers, storages, the engine and its workers.

``python -m pipeline.search --study NAME`` runs a study (``cli``); see docs/architecture.md for
the module of each step.
"""
