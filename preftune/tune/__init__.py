"""Drivers around whole runs: iterative DPO rounds, hyperparameter sweeps, and human review sheets.

    preftune iterate CONFIG         rounds of sample -> judge -> pairs -> validate -> train -> evaluate
    preftune sweep CONFIG           Optuna trials, each a normal run, scored by win rate, KL and coherence
    preftune review export|import   blind A/B sheets for people, and their answers turned into numbers

Every call into the rest of preftune goes through :mod:`preftune.tune.adapter`. See docs/tune.md.
"""
