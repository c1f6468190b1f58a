"""The `preftune` command line.

    preftune quickstart [--method M] [--out DIR]         offline demo: toy task, SFT, then DPO (online, iterative DPO,
                                                         GRPO, RLOO, PPO)
    preftune train CONFIG.yaml [--set k.sub=v ...]       train from a YAML config (--resume / --overwrite)
    preftune data validate|clean|convert|agreement ...   preference-data tooling
    preftune generate / judge ...                        sample responses; judge them into pairs
    preftune eval MODEL --data PAIRS [--reference REF]   preference accuracy, KL, lengths, diversity, win rate
    preftune report RUN_DIR                              RUN_DIR/report.html: curves, alarms, samples
    preftune push RUN_DIR REPO                           RUN_DIR/final + model card to the Hugging Face Hub
    preftune iterate / sweep CONFIG                      iterative DPO rounds; Optuna hyperparameter sweeps
    preftune review export|import ...                    blind A/B sheets for human raters; their verdicts
    preftune export RUN --out DIR [--merge]              a run's model standalone (--merge: LoRA folded into its base)
    preftune losses                                      registered losses and what they need
    preftune config-doc                                  every config field with its type, default and doc

A user error prints one line and exits non-zero; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

QUICKSTARTS = {
    "dpo": "preftune.toy.quickstart:run_quickstart",
    "iterative_dpo": "preftune.tune.quickstart:run_iterative_quickstart",
    "online_dpo": "preftune.toy.quickstart:run_online_dpo_quickstart",
    "grpo": "preftune.toy.quickstart_grpo:run_grpo_quickstart",
    "rloo": "preftune.toy.quickstart_grpo:run_rloo_quickstart",
    "ppo": "preftune.toy.quickstart_ppo:run_ppo_quickstart",
}
"""``preftune quickstart --method NAME`` -> "module:function(out_dir, seed=...) -> report" (imported on use)."""


def _cmd_quickstart(args) -> int:
    import importlib

    module, _, name = QUICKSTARTS[args.method].partition(":")
    out = args.out or ("runs/quickstart" if args.method == "dpo" else f"runs/quickstart-{args.method}")
    report = getattr(importlib.import_module(module), name)(out, seed=args.seed)
    return 0 if report.get("passed", True) else 1


def _cmd_train(args) -> int:
    from preftune.config import to_config
    from preftune.trainer.loop import train

    config = to_config(args.config, args.set or [])
    resume = True if args.resume == "latest" else args.resume
    summary = train(config, resume=resume, overwrite=args.overwrite)
    keys = ("train_runtime_s", "samples_per_second", "tokens_per_second", "peak_rss_mb", "final_loss")
    print("summary: " + ", ".join(f"{k}={summary[k]:.4g}" for k in keys if summary.get(k) is not None))
    print(f"wrote {config.training.output_dir}/train_summary.json")
    return 0


def _cmd_losses(args) -> int:
    from preftune.losses import registered_losses

    print(f"{'name':<12} {'reference':<10} {'data':<9} {'hyperparameters':<36} description")
    for name, spec in sorted(registered_losses().items()):
        ref = "yes" if spec.needs_reference else "no"
        print(f"{name:<12} {ref:<10} {spec.data:<9} {', '.join(spec.hyperparameters):<36} {spec.description}")
    return 0


def _cmd_config_doc(args) -> int:
    from preftune.config import field_docs

    print("| key | type | default | meaning |\n|---|---|---|---|")
    for key, typ, default, doc in field_docs():
        if typ == "section":
            print(f"| **{key}** | section | | {doc} |")
        else:
            print(f"| `{key}` | {typ.replace('|', '/')} | {default.replace('|', '/')} | {doc} |")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="preftune", description="Preference tuning for language models.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("quickstart", help="offline demo: toy task, SFT, DPO (or --method), before/after evaluation")
    p.add_argument("--method", choices=sorted(QUICKSTARTS), default="dpo",
                   help="the demo: dpo (default), online_dpo (every step the policy samples, the toy verifier "
                        "scores, DPO trains best vs worst), grpo / rloo (the verifier's scores, group-relative or "
                        "leave-one-out advantages, clipped policy gradient), iterative_dpo (3 rounds of generate -> "
                        "judge -> train) or ppo (PPO with a critic, the toy verifier as reward)")
    p.add_argument("--out", help="output directory (default: runs/quickstart, runs/quickstart-METHOD for others)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_quickstart)

    p = sub.add_parser("train", help="train from a YAML config")
    p.add_argument("config", help="YAML config file")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value (repeatable)")
    p.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="continue from the newest checkpoint in output_dir, or from the given checkpoint dir")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the previous run in output_dir (a used output_dir is refused without --resume "
                        "or --overwrite)")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("losses", help="list registered losses")
    p.set_defaults(func=_cmd_losses)
    p = sub.add_parser("config-doc", help="print the config reference (markdown)")
    p.set_defaults(func=_cmd_config_doc)

    for module in ("preftune.data.cli", "preftune.rollout.cli", "preftune.eval.cli", "preftune.report.cli",
                   "preftune.tune.cli", "preftune.hub", "preftune.export"):
        __import__(module, fromlist=["register"]).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from preftune.errors import PreftuneError

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # accepted anywhere on the line, not only before the command
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    args = parser.parse_args(argv)
    args.debug = debug
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one readable line; the traceback only on request
        if args.debug:
            traceback.print_exc()
        known = isinstance(e, (PreftuneError, FileNotFoundError, PermissionError))
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        prefix = "error" if known else f"error ({type(e).__name__})"
        hint = "" if args.debug else " (run with --debug for the traceback)"
        print(f"{prefix}: {text}{hint if not known else ''}", file=sys.stderr)
        return 2 if known else 1


if __name__ == "__main__":
    sys.exit(main())
