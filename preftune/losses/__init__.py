"""Loss functions (torch only) and the registry the trainer reads.

Importing this package registers every loss family; ``get_loss(name)`` returns its :class:`LossSpec`.
Weighted mixes (RPO, MPO) are not registered losses: the trainer calls each component and passes the
outputs to :func:`combine`.
"""

from preftune.losses.base import LossOutput, LossSpec, get_loss, register_loss, registered_losses
from preftune.losses.combine import combine
from preftune.losses.dpo import (
    aot,
    apo_down,
    apo_zero,
    bco_pair,
    discopop,
    dpo,
    exo_pair,
    hinge,
    ipo,
    nca_pair,
    robust,
    sppo_hard,
)
from preftune.losses.kto import kto
from preftune.losses.orpo import orpo
from preftune.losses.reward import bradley_terry  # noqa: F401  (registers the reward-model loss)
from preftune.losses.sft import sft
from preftune.losses.simpo import simpo

__all__ = [
    "LossOutput",
    "LossSpec",
    "get_loss",
    "register_loss",
    "registered_losses",
    "combine",
    "aot",
    "apo_down",
    "apo_zero",
    "bco_pair",
    "discopop",
    "dpo",
    "exo_pair",
    "hinge",
    "ipo",
    "kto",
    "nca_pair",
    "orpo",
    "robust",
    "sft",
    "simpo",
    "sppo_hard",
]
