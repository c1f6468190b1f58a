"""Loss functions (torch only) and the registry the trainer reads.

Importing this package registers every loss family; ``get_loss(name)`` returns its :class:`LossSpec`.
"""

from preftune.losses import dpo as _dpo  # noqa: F401  (registers)
from preftune.losses.base import LossOutput, LossSpec, get_loss, register_loss, registered_losses
from preftune.losses.dpo import dpo

__all__ = ["LossOutput", "LossSpec", "get_loss", "register_loss", "registered_losses", "dpo"]
