"""Watching a run while it trains: margin health, KL to the reference, reward-hacking alarms, samples, early
stopping and the best model. ``health`` holds the pure checks over metric records, ``samples`` the periodic
generations, ``monitor.Monitor`` what the training loop calls (see docs/monitoring.md)."""
