"""Report: studies read back from the MLflow store into tables, figures and a report.

Imports no torch and never trains: ``python -m pipeline.report --study NAME``.
"""
