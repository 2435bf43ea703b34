"""Applies every patch in ``patches.py`` to a Python process started with this folder on
PYTHONPATH (``default_studies.py --proposals`` does that for its ``pipeline.search`` runs)."""

import patches

for _patch in patches.ALL.values():
    _patch()
