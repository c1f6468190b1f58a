"""Loss functions (torch only) and the registry the trainer reads.

Importing this package registers every loss family; ``get_loss(name)`` returns its :class:`LossSpec`, which
also says which hyperparameters the loss takes and which values are legal or usual. One family per file:
``dpo`` (logistic on the preference logit: dpo, robust, aot), ``margin`` (other functions of it: ipo, hinge,
exo_pair, discopop), ``anchored`` (each side's log-ratio on its own: nca_pair, bco_pair, sppo_hard, apo_zero,
apo_down), ``kto``, ``orpo``, ``simpo``, ``sft``, ``reward`` (Bradley-Terry), ``grpo`` (policy gradient on on-policy groups;
the pure math in ``policy``), ``ppo`` (PPO with a critic: the pure math and the registered loss).
Weighted mixes (RPO, MPO) are not registered losses: the trainer calls each component and passes the
outputs to :func:`combine`.
"""

from preftune.losses.anchored import apo_down, apo_zero, bco_pair, nca_pair, sppo_hard
from preftune.losses.base import (
    LossOutput,
    LossSpec,
    check_combined_params,
    get_loss,
    register_loss,
    registered_losses,
)
from preftune.losses.combine import combine
from preftune.losses.dpo import aot, dpo, robust
from preftune.losses.grpo import grpo
from preftune.losses.kto import kto
from preftune.losses.margin import discopop, exo_pair, hinge, ipo
from preftune.losses.orpo import orpo
from preftune.losses.ppo import ppo
from preftune.losses.ranges import Range
from preftune.losses.reward import bradley_terry  # noqa: F401  (registers the reward-model loss)
from preftune.losses.sft import sft
from preftune.losses.simpo import simpo

__all__ = [
    "LossOutput",
    "LossSpec",
    "check_combined_params",
    "get_loss",
    "register_loss",
    "registered_losses",
    "combine",
    "Range",
    "aot",
    "grpo",
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
    "ppo",
    "robust",
    "sft",
    "simpo",
    "sppo_hard",
]
