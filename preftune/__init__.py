"""preftune: preference tuning for language models."""

__version__ = "0.1.0"


def train(config, *, resume=None, overwrite=False, log=print, callbacks=None) -> dict:
    """Run a training job from a Config, a dict or a YAML path; returns the run summary.

    ``resume``: True (the newest checkpoint in ``output_dir``) or a checkpoint path; ``overwrite``: replace the
    previous run in ``output_dir``. A used ``output_dir`` is refused without one of them.
    ``callbacks``: objects with any of ``on_step(step, metrics, state)``, ``on_eval(step, metrics, state)``,
    ``on_save(step, path, state)``, ``on_end(summary, state)`` (see :mod:`preftune.trainer.callbacks`).
    See :func:`preftune.trainer.loop.train`.
    """
    from preftune.trainer.loop import train as _train

    return _train(config, resume=resume, overwrite=overwrite, log=log, callbacks=callbacks)
