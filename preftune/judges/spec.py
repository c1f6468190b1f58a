"""A judge from a command-line ``--judge`` value: a file, an inline mapping, the toy verifier or a callable.

Shared by ``preftune judge``, ``preftune eval --judge`` and the drivers, so each accepts the same values.
"""

from __future__ import annotations

import os

from preftune.errors import PreftuneError

JUDGE_HELP = (
    "a judge YAML file (schema: preftune/judges/registry.py), an inline YAML mapping such as "
    "'{type: llm, model: m, base_url: http://localhost:8000/v1, api_key_env: null}', 'toy-verifier' "
    "(alias 'verifier:toy': the quickstart task's verifier), or 'callable:package.module:function' "
    "(a function (prompt, response) -> float)"
)
# The toy task's verifier, reached by name like any user's callable (the toy package sits above the judges).
TOY_VERIFIER = "preftune.toy:verifier_score"


def make_judge(spec: str):
    """A judge from the ``--judge`` value (see :data:`JUDGE_HELP`)."""
    from preftune.judges.registry import build_judge

    try:
        if spec in ("toy-verifier", "verifier:toy"):
            judge = build_judge({"type": "verifier", "kind": "callable", "target": TOY_VERIFIER})
            judge.name = "toy-verifier"
            return judge
        if spec.startswith("callable:"):
            return build_judge({"type": "verifier", "kind": "callable", "target": spec[len("callable:"):]})
        if os.path.exists(spec):
            return build_judge(spec)
        if spec.lstrip().startswith("{"):
            import yaml

            try:
                inline = yaml.safe_load(spec)
            except yaml.YAMLError as e:
                raise PreftuneError(f"--judge <inline>: invalid YAML ({getattr(e, 'problem', None) or e})") from None
            return build_judge(inline)
    except PreftuneError:
        raise
    except (ValueError, TypeError, ImportError, AttributeError, OSError) as e:
        raise PreftuneError(f"--judge {spec if not spec.lstrip().startswith('{') else '<inline>'}: {e}") from None
    if spec.endswith((".yaml", ".yml", ".json")):
        raise PreftuneError(f"judge config not found: {spec}")
    raise PreftuneError(f"--judge {spec!r}: not a file, an inline mapping, 'toy-verifier' or 'callable:mod:fn'")
