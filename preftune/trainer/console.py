"""What a run prints: log lines that never stick to the progress bar, and the bar itself.

Log lines (data checks, monitor diagnoses, samples, alarms) go through ``tqdm.write`` (the default ``print``)
or, for another ``log`` callable, inside ``tqdm.external_write_mode``: the bar is cleared, the line written, the
bar redrawn below it. The bar is redrawn once per optimizer step at most (tqdm also throttles it to ten a
second); its ``tok/s`` is training tokens over training time, evaluations and checkpoints left out.
"""

from __future__ import annotations


def console(log):
    """``log`` made safe to call while a progress bar is on screen."""
    from tqdm.auto import tqdm

    if log is print:
        return lambda *args: tqdm.write(" ".join(str(a) for a in args))

    def say(*args):
        with tqdm.external_write_mode():
            log(*args)

    return say


class Progress:
    """The training bar (None-safe: ``enabled=False`` makes every call a no-op)."""

    def __init__(self, enabled: bool, total: int, initial: int):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True)

    def step(self, values: dict, tokens_per_second: float) -> None:
        """Advance one optimizer step: the postfix is set without a redraw, ``update`` draws once."""
        if self.bar is None:
            return
        self.bar.set_postfix(loss=f"{values['loss']:.4f}", margin=f"{values.get('rewards/margins', 0):.3f}",
                             acc=f"{values.get('rewards/accuracies', 0):.2f}", tok_s=f"{tokens_per_second:.0f}",
                             refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
