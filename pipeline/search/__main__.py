"""``python -m pipeline.search``: run a study (pipeline.search.cli)."""

from pipeline import gc_policy
from pipeline.search.cli import main

gc_policy.pause()  # until the worker loop starts (gc_policy.py)
raise SystemExit(main())
