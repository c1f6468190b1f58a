"""``preftune quickstart --method ppo``: PPO with a critic from the toy SFT model, offline.

    toy task -> SFT (the DPO quickstart's SFT phase, ``toy.quickstart.sft_phase``) -> PPO: each rollout the
    policy answers 32 fresh prompts once at temperature 1, the toy verifier scores the answers (1 or 0),
    rewards are shaped per token with a KL penalty to the SFT model, a critic (a copy of the SFT model with a
    value head) gives V(s_t) for GAE, and the rollout trains 2 epochs x 2 minibatches -> before/after

No pair is written by hand and no answer is compared with another: the verifier's score and the critic's
values are all the signal. Writes ``out/report.json`` with ``before`` / ``after`` ``generation_accuracy``
(greedy answers on the held-out prompts that the verifier accepts, as the other demos measure it), the
run's final PPO statistics (explained variance, KL to the SFT model, value error), the checks and the wall
time; the PPO run's own files (``metrics.jsonl``, ``samples.jsonl``, ``plots/``, ``report.html``,
``final/``) are in ``out``, the SFT run in ``out/sft`` (or the reused ``sft_dir``).
"""

from __future__ import annotations

import time
from pathlib import Path

from preftune.toy.quickstart import (
    MAX_LENGTH,
    MAX_NEW_TOKENS,
    generation_accuracy,
    on_policy_report,
    run_on_one_thread,
    sft_phase,
)

# The recipe. A rollout: 32 prompts (16 per minibatch x 2 minibatches), one sample each; 2 epochs over it, so
# 4 optimizer steps per rollout and 6 rollouts in 24 steps. A separate critic at 5x the policy's learning rate:
# on a 0.1M-parameter model a value head on the policy's own trunk learns the values too slowly to help
# (value error still ~0.45 after 40 steps, against ~0.05 for the separate critic); the policy's rate is the
# online DPO demo's. KL coefficient 0.05 (TRL's default; seed 001 #4: 0.01-0.2).
PPO = {"steps": 24, "prompts_per_minibatch": 16, "minibatches": 2, "ppo_epochs": 2, "num_generations": 1,
       "temperature": 1.0, "learning_rate": 2e-4, "critic": "policy", "critic_learning_rate": 1e-3,
       "kl_coef": 0.05, "vf_coef": 0.1, "gamma": 1.0, "gae_lambda": 0.95, "eval_prompts": 64}
TARGETS = {"generation_accuracy": 0.90, "gain": 0.25}


def ppo_config(out: Path, seed: int, train_prompts: list, eval_prompts: list) -> dict:
    """The PPO run of ``--method ppo`` (everything but the model and tokenizer)."""
    p = PPO
    return {
        "data": {"train": [{"prompt": it.prompt} for it in train_prompts],
                 "eval": [{"prompt": it.prompt} for it in eval_prompts[: p["eval_prompts"]]]},
        "loss": {"name": "ppo", "kl_coef": p["kl_coef"], "vf_coef": p["vf_coef"]},
        "rollout": {"num_generations": p["num_generations"], "temperature": p["temperature"],
                    "max_new_tokens": MAX_NEW_TOKENS, "ppo_epochs": p["ppo_epochs"], "minibatches": p["minibatches"],
                    "gamma": p["gamma"], "gae_lambda": p["gae_lambda"], "critic": p["critic"],
                    "critic_learning_rate": p["critic_learning_rate"]},
        "reward": {"functions": ["preftune.rewards:toy_verifier"]},
        "training": {"output_dir": str(out), "learning_rate": p["learning_rate"],
                     "per_device_batch_size": p["prompts_per_minibatch"], "max_steps": p["steps"],
                     "max_length": MAX_LENGTH, "seed": seed, "logging_every": 2, "eval_every": 12,
                     "progress_bar": False},
        "monitor": {"num_prompts": 8},
    }


def run_ppo_quickstart(out_dir: str | Path, seed: int = 0, log=print, *, sft_dir: str | Path | None = None) -> dict:
    """SFT the toy model, train it with PPO against the toy verifier, evaluate before and after.

    ``sft_dir``: the ``sft`` directory of an earlier quickstart with the same seed, reused instead of training SFT
    again (the tests share one).
    """
    return run_on_one_thread(_run, out_dir, seed, log, sft_dir)


def _run(out: Path, seed: int, log, t_start: float, sft_dir) -> dict:
    import preftune

    sft = sft_phase(out, seed, log, sft_dir)
    tokenizer, model, held_out = sft.tokenizer, sft.model, sft.held_out
    before, before_rows = generation_accuracy(model, tokenizer, held_out)
    model.train()
    config = ppo_config(out, seed, sft.items, held_out)
    p = PPO
    log(f"quickstart: PPO, {p['steps']} steps; rollouts of {p['prompts_per_minibatch'] * p['minibatches']} prompts "
        f"x {p['num_generations']} sample, {p['ppo_epochs']} epochs x {p['minibatches']} minibatches; reward "
        "preftune.rewards:toy_verifier, critic: a copy of the SFT model with a value head")
    t0 = time.perf_counter()
    summary = preftune.train({"model": model, "tokenizer": tokenizer, **config}, log=lambda *_: None)
    log(f"quickstart: PPO {summary['steps']} steps in {time.perf_counter() - t0:.1f}s, final loss "
        f"{summary['final_loss']:.3f}")
    after, after_rows = generation_accuracy(model, tokenizer, held_out)
    train = summary["final_train_metrics"]
    final = {"eval/reward/mean": summary["final_eval_metrics"].get("reward/mean"),
             **{f"train/{k}": train.get(k) for k in ("reward/mean", "ppo/explained_variance", "ppo/kl_ref",
                                                     "ppo/kl_penalty_share", "value/error", "entropy",
                                                     "policy/clip_frac", "policy/approx_kl_k3")}}
    table = (f"{'metric':<24}{'before':>8}{'after':>8}   target\n" + "-" * 52 + "\n"
             f"{'generation_accuracy':<24}{before:>8.3f}{after:>8.3f}   >= {TARGETS['generation_accuracy']:.2f}")
    return on_policy_report("ppo", out=out, seed=seed, t_start=t_start, log=log, sft=sft, summary=summary,
                            config=config, recipe=PPO, targets=TARGETS, final=final,
                            before=(before, before_rows), after=(after, after_rows), table=table)
