"""``python -m pipeline.report``: write a study's report (pipeline.report.cli)."""

from pipeline import gc_policy
from pipeline.report.cli import main

gc_policy.pause()  # until the figures are drawn (gc_policy.py)
raise SystemExit(main())
