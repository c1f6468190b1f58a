"""preftune: preference tuning for language models."""

__version__ = "0.1.0"


def train(config, *, resume=None, log=print) -> dict:
    """Run a training job from a Config, a dict or a YAML path; returns the run summary.

    See :func:`preftune.trainer.loop.train`.
    """
    from preftune.trainer.loop import train as _train

    return _train(config, resume=resume, log=log)
