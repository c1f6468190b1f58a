"""The model card of a run and ``preftune push RUN_DIR REPO``: the final model or adapter to the Hugging Face Hub.

The card (``RUN_DIR/final/README.md``) is written at the end of every run that saves its model, from the run
directory alone (``config.yaml``, ``train_summary.json``, ``metrics.jsonl``), so ``push`` can rebuild it for any
finished run. It holds: the hub metadata (``base_model`` when it is a hub id, ``library_name`` transformers or
peft, tags with the method), the base model, the method and its loss hyperparameters, LoRA or full
fine-tuning, the data (source, examples used, rows dropped, fingerprints of the tokenized examples and of local
files), the key metrics, how to load it, and the whole config.

Uploading goes through ``huggingface_hub`` (``create_repo`` + ``upload_folder``; the token from ``HF_TOKEN`` or
``hf auth login``, the endpoint from ``HF_ENDPOINT``). Any failure, offline mode and an unreachable hub
included, is one :class:`~preftune.errors.PreftuneError` line that says the model stays on disk and how to push
it later.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import yaml

from preftune.configfile import read_config
from preftune.errors import ConfigError, PreftuneError
from preftune.runlog import read_metrics

CARD_FILE = "README.md"
KEY_METRICS = ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _is_hub_id(value) -> bool:
    return isinstance(value, str) and bool(_HUB_ID.match(value)) and not Path(value).expanduser().exists()


def _num(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def model_card(run_dir: str | Path, repo_id: str | None = None) -> str:
    """The model card of the run in ``run_dir`` as markdown with YAML front matter."""
    run_dir = Path(run_dir)
    config = read_config(run_dir) or {}
    summary_path = run_dir / "train_summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    final = run_dir / "final"
    adapter = (final / "adapter_config.json").exists()
    loss = dict(config.get("loss") or {})
    names = loss.pop("name", None) or "dpo"
    names = names if isinstance(names, list) else [names]
    weights = loss.pop("weights", None)
    base = config.get("model")
    reward = config.get("task") == "reward"
    data = summary.get("data") or {}

    meta = {"library_name": "peft" if adapter else "transformers",
            "pipeline_tag": "text-classification" if reward else "text-generation",
            "tags": ["preftune", *names, *(["lora"] if adapter else [])]}
    if _is_hub_id(base):
        meta["base_model"] = base
    hub_data = [d.get("source") for d in data.values() if _is_hub_id(str(d.get("source", "")).split(":")[0])]
    if hub_data:
        meta["datasets"] = sorted({s.split(":")[0] for s in hub_data})

    lora = config.get("lora")
    how = (f"LoRA adapter (r={lora.get('r')}, alpha={lora.get('alpha')}, modules {lora.get('target_modules')})"
           if lora else "full fine-tuning")
    params = ", ".join(f"{k}={_num(v)}" for k, v in loss.items()) or "defaults"
    method = " + ".join(f"{w} x {n}" for n, w in zip(names, weights)) if weights else " + ".join(names)
    title = repo_id or run_dir.name
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "", f"# {title}", "",
             f"{'A reward model' if reward else 'A preference-tuned model'} trained with "
             f"preftune from **{base}**.", "",
             f"- method: `{method}` ({params})", f"- training: {how}, {summary.get('steps', '?')} optimizer steps, "
             f"{_num(summary.get('train_runtime_s', '?'))} s, precision {config.get('training', {}).get('precision')}"]
    if summary.get("stopped"):
        lines.append(f"- stopped early: {summary['stopped']}")
    lines += ["", "## Data", "", "| split | source | examples | tokenized fingerprint | file sha256 |",
              "|---|---|---|---|---|"]
    for split, d in data.items():
        lines.append(f"| {split} | `{d.get('source')}` | {d.get('examples')} | `{d.get('fingerprint', '')}` | "
                     f"{('`' + d['sha256'] + '`') if d.get('sha256') else ''} |")
    if summary.get("dropped_rows"):
        lines += ["", "Rows dropped before training: " + ", ".join(f"{k} {v}" for k, v in summary["dropped_rows"].items())]
    lines += ["", "## Results", "", "| metric | train (last step) | eval (final) |", "|---|---|---|"]
    train, evals = summary.get("final_train_metrics") or {}, summary.get("final_eval_metrics") or {}
    for key in KEY_METRICS:
        if key in train or key in evals:
            lines.append(f"| {key} | {_num(train.get(key, ''))} | {_num(evals.get(key, ''))} |")
    monitor = next((r for r in reversed(read_metrics(run_dir)) if r.get("split") == "monitor"), None)
    if monitor and monitor.get("kl/k3_seq") is not None:
        lines.append(f"| KL to the reference (k3, nats per sequence) | | {_num(monitor['kl/k3_seq'])} |")
    lines += ["", "## Use", "", "```python"]
    ref = repo_id or str(final)
    if adapter:
        lines += ["from peft import AutoPeftModelForCausalLM",
                  f'model = AutoPeftModelForCausalLM.from_pretrained("{ref}")  # the base model with the adapter']
    elif reward:
        lines += ["from transformers import AutoModelForSequenceClassification",
                  f'model = AutoModelForSequenceClassification.from_pretrained("{ref}")']
    else:
        lines += ["from transformers import AutoModelForCausalLM, AutoTokenizer",
                  f'model = AutoModelForCausalLM.from_pretrained("{ref}")',
                  f'tokenizer = AutoTokenizer.from_pretrained("{ref}")']
    lines += ["```", "", "## Training configuration", "", "```yaml",
              yaml.safe_dump(config, sort_keys=False, width=110).strip(), "```", ""]
    return "\n".join(lines)


def write_model_card(run_dir: str | Path, repo_id: str | None = None) -> Path:
    """Write ``run_dir/final/README.md``; returns its path."""
    final = Path(run_dir) / "final"
    if not final.is_dir():
        raise PreftuneError(f"{final} does not exist: the run saved no model (training.save_model: false?)")
    path = final / CARD_FILE
    path.write_text(model_card(run_dir, repo_id), encoding="utf-8")
    return path


def _push_error(err: Exception, endpoint: str) -> str:
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    if isinstance(err, OfflineModeIsEnabled):
        return "the hub is switched off here (HF_HUB_OFFLINE is set)"
    if isinstance(err, HfHubHTTPError):
        status = getattr(getattr(err, "response", None), "status_code", None)
        if status in (401, 403):
            return f"the hub refused ({status}): log in with `hf auth login` or set HF_TOKEN to a token with write access"
        return f"the hub answered {status}: {first}"
    names = {c.__name__ for c in type(err).__mro__}
    if names & {"ConnectionError", "ConnectError", "ConnectTimeout", "TimeoutException", "NetworkError",
                "TransportError", "Timeout"}:
        return f"cannot reach the hub at {endpoint} ({first})"
    return f"{type(err).__name__}: {first}"


def push(run_dir: str | Path, repo_id: str, *, private: bool = True, revision: str | None = None,
         commit_message: str | None = None) -> str:
    """Upload ``run_dir/final`` (model or adapter, tokenizer, the card rewritten for ``repo_id``); returns its URL."""
    from huggingface_hub import HfApi, constants

    run_dir = Path(run_dir)
    if not _HUB_ID.match(repo_id or ""):
        raise ConfigError(f"hub repository {repo_id!r}: expected `user/name` or `org/name`")
    final = run_dir / "final"
    write_model_card(run_dir, repo_id)
    endpoint = constants.ENDPOINT
    try:
        api = HfApi()
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(folder_path=str(final), repo_id=repo_id, revision=revision,
                          commit_message=commit_message or f"preftune: {run_dir.name}")
    except Exception as e:
        raise PreftuneError(f"push to {repo_id} failed: {_push_error(e, endpoint)}; nothing was lost: the model "
                            f"and its card are in {final}, push later with `preftune push {run_dir} {repo_id}`") from None
    return f"{endpoint}/{repo_id}"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "push", help="upload RUN_DIR/final (model or adapter + model card) to a Hugging Face Hub repository",
        description="Write the model card of a finished run (RUN_DIR/final/README.md) and upload RUN_DIR/final "
                    "to the hub repository REPO (created private unless --public). The token comes from HF_TOKEN "
                    "or `hf auth login`, the endpoint from HF_ENDPOINT.",
    )  # fmt: skip
    p.add_argument("run_dir", type=Path, help="the run's training.output_dir")
    p.add_argument("repo", help="user/name or org/name")
    p.add_argument("--public", action="store_true", help="create the repository public (default: private)")
    p.add_argument("--revision", default=None, help="branch to push to (default: main)")
    p.add_argument("--message", default=None, help="commit message")
    p.set_defaults(func=cmd_push)


def cmd_push(args: argparse.Namespace) -> int:
    if not (args.run_dir / "final").is_dir():
        raise PreftuneError(f"{args.run_dir / 'final'} not found: not a finished run that saved its model")
    url = push(args.run_dir, args.repo, private=not args.public, revision=args.revision, commit_message=args.message)
    print(f"pushed {args.run_dir / 'final'} to {url}")
    return 0
