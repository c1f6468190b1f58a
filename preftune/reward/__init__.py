"""Reward models beyond one: ensembles with an uncertainty penalty, multi-axis composites, ensemble training.

One reward model trains with ``preftune train`` (``task: reward``) and scores as ``judges.RewardModelJudge``.
"""

from preftune.judges.reward_ensemble import MultiAxisReward, RewardEnsemble, ensemble_paths
from preftune.reward.ensemble import train_ensemble

__all__ = ["MultiAxisReward", "RewardEnsemble", "ensemble_paths", "train_ensemble"]
