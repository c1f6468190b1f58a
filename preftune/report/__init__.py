"""Plots and reports, drawn from ``metrics.jsonl`` alone."""
