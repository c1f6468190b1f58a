"""Judges: pairwise verdicts and scalar rewards behind one interface (:class:`Judge`).

Pairwise judges are always asked both orders; disagreement is a tie, and ``judge.position_stats`` counts how
often that happened. ``build_judge(config)`` builds any judge from a dict or YAML file (schema in
:mod:`preftune.judges.registry`).
"""

from preftune.judges.base import (
    Judge,
    PositionBiasStats,
    ScoreBasedJudge,
    UnsupportedJudgeOperation,
    Verdict,
    combine_orders,
)
from preftune.judges.ensemble import EnsembleJudge, cohen_kappa, pairwise_kappa
from preftune.judges.llm import JudgeParseError, JudgeRequestError, LLMJudge
from preftune.judges.lm_judge import LMJudge
from preftune.judges.registry import build_judge, register_judge, registered_judge_types
from preftune.judges.reward_model import RewardModelJudge
from preftune.judges.verifiable import (
    CodeTestsVerifier,
    ExactMatch,
    JSONSchemaVerifier,
    RegexMatch,
    VerifierJudge,
    normalize_answer,
    run_code_tests,
)

__all__ = [
    "CodeTestsVerifier",
    "EnsembleJudge",
    "ExactMatch",
    "JSONSchemaVerifier",
    "Judge",
    "JudgeParseError",
    "JudgeRequestError",
    "LLMJudge",
    "LMJudge",
    "PositionBiasStats",
    "RegexMatch",
    "RewardModelJudge",
    "ScoreBasedJudge",
    "UnsupportedJudgeOperation",
    "Verdict",
    "VerifierJudge",
    "build_judge",
    "cohen_kappa",
    "combine_orders",
    "normalize_answer",
    "pairwise_kappa",
    "register_judge",
    "registered_judge_types",
    "run_code_tests",
]
