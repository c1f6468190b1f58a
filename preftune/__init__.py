"""preftune: preference tuning for language models."""

__version__ = "0.1.0"


def train(config, *, resume=None, log=print, callbacks=None) -> dict:
    """Run a training job from a Config, a dict or a YAML path; returns the run summary.

    ``callbacks``: objects with any of ``on_step(step, metrics, state)``, ``on_eval(step, metrics, state)``,
    ``on_save(step, path, state)``, ``on_end(summary, state)`` (see :mod:`preftune.trainer.callbacks`).
    See :func:`preftune.trainer.loop.train`.
    """
    from preftune.trainer.loop import train as _train

    return _train(config, resume=resume, log=log, callbacks=callbacks)
