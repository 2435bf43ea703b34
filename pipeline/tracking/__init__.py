"""Tracking: every MLflow write, through an explicit client and run ids.

``client`` (stores, runs, params, metrics, artifacts, models), ``writer`` (a child process that
performs a trial's writes while the next trial trains), ``spool`` (writes kept on disk while a
store is away), ``training_run`` (one training run, logged as it goes).
"""
