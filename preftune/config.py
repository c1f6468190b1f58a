"""Typed run configuration: YAML in, dotted ``--set`` overrides, every problem reported at once.

Each field is documented once, in the string directly under it, and a numeric field declares its range next to
it (``within("[0, 1]", default)``); ``preftune config-doc`` and the README's config reference are generated from
both (``field_docs``). :func:`to_config` reads a config and checks it whole: unknown keys (with the nearest key
in any section, and TRL's names pointed home), types, ranges, and the checks across fields in :func:`validate`
(loss hyperparameters as the loss spec states them, task and loss kind, lengths). A hyperparameter with no safe
default has none: leaving it out is an error that names it. The reading machinery is ``config_reader``, the
checks across fields are ``config_checks`` and TRL's names are ``trl_names``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from preftune.config_checks import DEFAULT_LOSS, loss_names, loss_takers, run_checks, taken_by
from preftune.config_reader import (
    REQUIRED,
    Problems,
    Reader,
    load_yaml,
    merge,
    parse_overrides,
    shallow,
    within,
)
from preftune.config_reader import field_docs as _reader_field_docs
from preftune.trl_names import TRL_NAMES

__all__ = ["Config", "DataConfig", "EngineConfig", "LoraConfig", "LossConfig", "MonitorConfig", "ReferenceConfig",
           "TrainingConfig", "DEFAULT_LOSS", "TRL_NAMES", "check_loss_params", "field_docs", "load_yaml",
           "parse_overrides", "to_config", "validate"]


@dataclass
class DataConfig:
    train: Any = None
    """Training rows: a JSONL/JSON/Parquet/CSV path or glob (`data/*.jsonl`), a `save_to_disk` directory, a hub
    id (`name`, `name:split` or `name:subset:split`), a list of such sources, each a string or `{path, weight,
    split, name}` (`name`: the hub subset; with `weight` on every source, examples are drawn from source i with
    probability weight_i / Σ weights, a source that runs out starting over reshuffled; without weights the rows
    are pooled), or (from Python) a `datasets.Dataset` / list of dicts."""
    eval: Any = None
    """Held-out rows in any form `train` accepts; if absent, `eval_fraction` of train is held out."""
    eval_fraction: float = within("[0, 1)", 0.0)
    """Fraction of train rows held out for evaluation when `eval` is not given (0 disables evaluation); setting
    it together with `eval` is refused (one of them would be ignored)."""
    max_prompt_length: int | None = within("[1, ∞)", None)
    """Prompts longer than this many tokens are truncated (see `truncation_mode`); None: only `max_length` limits.
    Must be below `training.max_length`, which bounds prompt + response."""
    truncation_mode: Literal["keep_end", "keep_start"] = "keep_end"
    """Which end of an over-long prompt to keep; `keep_end` keeps the last turn next to the response."""
    allow_unusable: bool = False
    """Train even when the data check finds the data unusable (errors dominate)."""
    split_seed: int | None = within("[0, ∞)", None)
    """Seed of the held-out rows drawn by `eval_fraction`; None: `training.seed` (a reward-model ensemble varies
    one and keeps the other)."""
    reward_margin: Literal["auto", "margin", "ratings", "none"] = "auto"
    """Reward models (`task: reward`): where each pair's margin m in −log σ(r_w − r_l − m) comes from.
    `margin`: the row's `margin` number; `ratings`: `ratings_scale` × (`score_chosen` − `score_rejected`), the
    rating columns `preftune data convert` keeps; `auto`: `margin` when any row has one, else none; `none`: m = 0.
    A row without the column(s) is dropped with its reason."""
    ratings_scale: float = within("(0, ∞)", 1.0)
    """With `reward_margin: ratings`, m = ratings_scale × (score_chosen − score_rejected) (no margins at all:
    `reward_margin: none`)."""
    chat_template: str | None = None
    """Chat template for conversational rows (a Jinja string, or the path of a file holding one), set on the
    tokenizer before tokenizing and saved with the model; None: the tokenizer's own. Without either,
    conversational rows drop as `no_chat_template` and the data check calls the data unusable. A row's `tools`
    column (a list of JSON schemas, or that list as a JSON string) is passed to the template as `tools=`."""
    num_proc: int | None = within("[1, ∞)", None)
    """Processes that tokenize (`datasets.map(num_proc=...)`); None: one. The tokenized set is cached on disk
    under `cache_dir`, keyed by the rows and the tokenization rules, so a second run does not tokenize again."""
    cache_dir: str | None = None
    """Where tokenized data is cached; default `$PREFTUNE_CACHE/tokenized` (`~/.cache/preftune/tokenized`)."""
    streaming: bool = False
    """Read `train` as a stream instead of loading it (data bigger than memory): rows are read, shuffled
    through a `shuffle_buffer` seeded by (seed, epoch) and tokenized as the steps need them. Needs
    `training.max_steps` (a stream has no known length) and `data.eval` (nothing to hold out from); the
    reference is scored live (LoRA's adapter-disabled base, a frozen copy or `reference.model`), never
    precomputed; the data check reads the first 10,000 rows; `--resume` replays the stream to its position
    without tokenizing. See docs/data.md."""
    shuffle_buffer: int = within("[1, ∞)", 10000)
    """Streaming: rows held in the shuffle buffer (1: the file order). A row is drawn uniformly from the
    buffer, which refills from the stream, so rows far apart in the file rarely meet within one batch: a larger
    buffer shuffles better and holds more rows in memory."""


@dataclass
class LossConfig:
    name: str | list[str] | None = None
    """Registered loss name (`preftune losses` lists them), or a list for a weighted combination (e.g. MPO);
    None: `dpo`, or `bradley_terry` with `task: reward`."""
    weights: list[float] | None = within("[0, ∞)", None)
    """Weight per loss when `name` is a list (default 1.0 each); one per loss."""
    params: dict[str, Any] = field(default_factory=dict,
                                   metadata={"rest": ("<hyperparameter>", "per loss")})
    """Hyperparameters of the loss, written directly in the `loss:` section (`beta: 0.1`, `gamma: 0.5`, ...):
    the loss spec states which it takes, which are required and their ranges (`preftune losses`)."""


@dataclass
class LoraConfig:
    r: int = within("[1, ∞)", 64)
    """LoRA rank; DPO benefits from more capacity than SFT (64-128 is typical)."""
    alpha: int = within("[1, ∞)", 128)
    """LoRA scaling numerator (scale = alpha / r)."""
    dropout: float = within("[0, 1)", 0.0)
    """Dropout on the LoRA input; 0 keeps the adapter-disabled reference pass identical across calls."""
    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])
    """Module names (or `all-linear`) that receive adapters."""
    quantization: Literal["4bit", "8bit"] | None = None
    """QLoRA: load the base weights quantized by bitsandbytes (`4bit`: NF4 with double quantization; `8bit`:
    LLM.int8), computing in `model_dtype` (`bf16` is the usual choice), and train the adapter on top
    (`prepare_model_for_kbit_training`). Needs a CUDA GPU and `pip install bitsandbytes`; the reference is the
    adapter-disabled quantized base. `preftune export RUN --merge` merges into the unquantized base."""


@dataclass
class ReferenceConfig:
    model: str | None = None
    """Reference model path or hub id; None uses the initial policy (the adapter-disabled base with LoRA)."""
    precompute: bool = True
    """Compute reference log-probs once before training and cache them on disk instead of every step. Static
    data only: an on-policy run (`rollout:`) scores its fresh samples with the live reference every step."""
    cache_dir: str | None = None
    """Where cached reference log-probs live; default `$PREFTUNE_CACHE` or `~/.cache/preftune/reference`."""


@dataclass
class EngineConfig:
    layout: Literal["padded", "shared_prompt", "packed"] = "packed"
    """How sequences are laid out for the forward pass; all give the same log-probs (tested to 1e-5 in fp32).
    `packed`: the prompt runs once per pair (rejected never sees chosen) and short pairs share a row, so padding
    is near zero; `shared_prompt`: one row per pair; `padded`: one right-padded row per sequence, for attention
    implementations that take no 4-D mask (flash_attention_2)."""
    chunk_size: int = within("[0, ∞)", 256)
    """Completion tokens per LM-head chunk; at most chunk_size x vocabulary logits exist at once (forward and
    backward), e.g. 50 MiB in fp32 for a 49k vocabulary. Larger chunks were no faster on CPU. 0: no chunking,
    the completion positions' full logits through plain autograd (the naive head; same log-probs)."""
    group_by_length: bool = False
    """Batch training examples of similar length together (shuffled within mega-batches of 50 micro-batches,
    then the batches shuffled), so packed and padded rows carry little padding on data with a wide length
    spread. Off by default: it changes which examples share a step, and on the toy tasks length-homogeneous
    batches learned measurably worse (several method tests fell below their accuracy floor)."""
    compile: bool = False
    """Compile each decoder layer with `torch.compile` (inductor; on CPU it needs a C++ compiler). Fuses the
    element-wise work between the matrix products and recomputes it in backward instead of saving it: on the
    135M benchmark model on CPU, bf16 steps ran 1.2x faster and peak RSS fell 11-16% (fp32 steps: about the
    same speed, matrix products dominate), after 10-20 s of compilation. The precomputed reference pass,
    generation and gradient-checkpoint recomputation stay eager. Same math, rounded in a different order
    (parity with the eager path is tested to 1e-5 in fp32)."""
    reuse_freed_memory: bool = True
    """On CPU (Linux, glibc): keep freed memory in the heap for reuse during training instead of returning it to
    the system after every tensor, so steps stop paying page faults for their activations and gradients (10%
    faster end to end on the 135M bf16 benchmark, 1% more peak RSS); restored when training ends. No math
    changes."""
    gradient_checkpointing: bool = False
    """Recompute decoder activations in backward (less memory, about a third more compute)."""
    cast_once: bool = False
    """Under `training.precision: bf16`: cast each fp32 weight (and the LM head) to bf16 once per optimizer step,
    not once per micro-batch (bitwise the same math). Off: on the 135M CPU benchmark it cut the casts' time by 17%
    (0.8 s of a 33 s step, lost in the noise end to end) for 2-3% more peak RSS. Ignored under FSDP / DeepSpeed."""


@dataclass
class TrainingConfig:
    output_dir: str = REQUIRED
    """Run directory: metrics, checkpoints, dropped rows, the final model; one run per directory (a used one
    needs `--resume` or `--overwrite`)."""
    learning_rate: float = within("[0, ∞)")
    """Peak learning rate (DPO full fine-tuning usually 5e-7..5e-6; LoRA 5e-6..5e-5); 0 leaves the weights where
    they start (a run that only evaluates, or checks that the policy starts at the reference)."""
    per_device_batch_size: int = within("[1, ∞)", 2)
    """Preference pairs (or completions, for unpaired losses) per process per micro-batch; on-policy runs
    (`rollout:`): prompts, each sampled `rollout.num_generations` times."""
    gradient_accumulation_steps: int = within("[1, ∞)", 1)
    """Micro-batches per optimizer step; global batch = per_device_batch_size x this x processes."""
    num_epochs: float = within("(0, ∞)", 1.0)
    """Passes over the training data, fractions allowed (ignored when `max_steps` is set)."""
    max_steps: int | None = within("[1, ∞)", None)
    """Optimizer steps to run; overrides `num_epochs`. None: `num_epochs` decides (0 is refused, not read as
    "unset")."""
    warmup_ratio: float = within("[0, 1]", 0.0)
    """Fraction of steps with linear warmup from 0."""
    lr_scheduler: Literal["linear", "cosine", "constant"] = "linear"
    """Decay after warmup."""
    weight_decay: float = within("[0, ∞)", 0.0)
    """AdamW decoupled weight decay."""
    adam_betas: list[float] = within("[0, 1)", default_factory=lambda: [0.9, 0.999])
    """AdamW (beta1, beta2): two values."""
    max_grad_norm: float | None = within("[0, ∞)", 1.0)
    """Clip the global gradient norm to this value; None or 0: no clipping (a negative value is refused: it would
    flip every update into gradient ascent)."""
    max_length: int = within("[1, ∞)", 512)
    """Maximum tokens of prompt + one response; longer responses are truncated, longer prompts dropped."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """Compute precision: `bf16` autocasts matrix products on CPU and GPU, weights stay in `model_dtype` (fp32
    by default; bf16 weights are the other mode, `model_dtype: bf16`). On a CPU without native bf16 (no AMX or
    AVX512-BF16, e.g. AVX2-only AMD EPYC) bf16 is emulated and far slower than fp32, so it is refused there
    unless `allow_slow_bf16`."""
    allow_slow_bf16: bool = False
    """Run `precision: bf16` or `model_dtype: bf16` / `fp16` on a CPU without native units for that dtype
    anyway (tens of times slower than fp32)."""
    master_weights: bool = True
    """With `model_dtype` bf16 or fp16 (full fine-tuning): the optimizer keeps an fp32 copy of every trained
    weight and its AdamW moments in fp32, updates the copy and writes it back rounded (bf16 has 8 bits of
    mantissa: an update below 1/256 of a weight would otherwise round away). False: AdamW updates the
    low-precision weights in place, moments in their dtype (4 bytes less per weight, and small updates are
    lost). LoRA adapters are fp32 whatever `model_dtype` is."""
    seed: int = within("[0, 4294967295]", 0)
    """Seeds data order, initialisation of adapters and every RNG."""
    eval_every: int = within("[0, ∞)", 0)
    """Evaluate every N optimizer steps (0: only at the end)."""
    save_every: int = within("[0, ∞)", 0)
    """Write a resumable checkpoint every N optimizer steps (0: none)."""
    save_total_limit: int = within("[0, ∞)", 2)
    """Checkpoints of this run kept on disk (oldest step removed first); 0: all are kept."""
    logging_every: int = within("[1, ∞)", 1)
    """Write train metrics every N optimizer steps."""
    max_nonfinite_steps: int = within("[1, ∞)", 3)
    """Consecutive non-finite steps (skipped) after which the run stops, naming the last good checkpoint."""
    save_model: bool = True
    """Save the final model (or adapter) in Hugging Face format under `output_dir/final`."""
    progress_bar: bool = True
    """Show a progress bar with loss, margin, accuracy and tokens/s."""
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    """Experiment trackers for every metric and the config (accelerate's: tensorboard, wandb, mlflow, ...; [])."""
    push_to_hub: bool = False
    """Upload `output_dir/final` with its model card to `hub_model_id` at the end (as `preftune push`)."""
    hub_model_id: str | None = None
    """Hugging Face Hub repository for `push_to_hub`, `user/name`; created private when it does not exist."""


@dataclass
class MonitorConfig:
    enabled: bool = True
    """Watch the run at every evaluation: margin health, KL to the reference, reward-hacking alarms, samples,
    early stopping and the best model (needs held-out data; see docs/monitoring.md)."""
    num_prompts: int = within("[0, ∞)", 16)
    """Held-out prompts (the first distinct ones of the eval set) generated for at each evaluation (0: none)."""
    max_new_tokens: int = within("[1, ∞)", 32)
    """Tokens per monitor generation at most."""
    max_kl: float | None = within("(0, ∞)", None)
    """Stop the run (the best model is kept) when KL to the reference, k3 estimate in nats per sequence,
    exceeds this (e.g. 10); None: never."""
    kl_spike_factor: float = within("[1, ∞)", 10.0)
    """Alarm when KL exceeds this multiple of its first measured value (or of 0.5 nats per sequence, if larger)."""
    reward_max_fraction: float = within("(0.5, 1]", 0.99)
    """Alarm when σ(mean eval implicit-reward margin) exceeds this: the implicit reward is saturated (at 0.5 or
    below it would fire whenever chosen is preferred, which is what training aims for)."""
    min_distinct_ratio: float = within("[0, 1]", 0.5)
    """Alarm when distinct-1 or distinct-2 of the policy's generations falls below this fraction of the
    reference's."""
    max_repetition: float = within("[0, 1]", 0.5)
    """Alarm when the self-repetition of the policy's generations (share of repeated bigrams) exceeds this."""
    max_length_ratio: float = within("[1, ∞)", 1.5)
    """Alarm when the mean generation length exceeds this multiple of the reference's."""
    min_length_ratio: float = within("[0, 1]", 0.5)
    """Alarm when the mean generation length falls below this multiple of the reference's."""
    sample_every: int | None = within("[1, ∞)", None)
    """Write greedy samples every N optimizer steps; None: at every evaluation."""
    print_samples: int = within("[0, ∞)", 2)
    """Samples echoed to the console each time (all go to samples.jsonl and TensorBoard)."""
    early_stopping_metric: str | None = None
    """Metric for the best model and early stopping, `split/key` from metrics.jsonl (e.g.
    `eval/rewards/accuracies`, `monitor/kl/k3_seq`); None: `eval/loss`, or `eval/reward/mean` (held-out reward
    of greedy samples) in an on-policy run."""
    early_stopping_mode: Literal["auto", "min", "max"] = "auto"
    """Whether lower or higher is better; auto: higher for accuracies, margins, rewards and win rates."""
    patience: int | None = within("[1, ∞)", None)
    """Stop after this many evaluations without improvement of `early_stopping_metric`; None: never."""
    save_best: bool = True
    """Keep the model at the best `early_stopping_metric` in `output_dir/best` (rewritten when it improves;
    only when `training.save_model`)."""


@dataclass
class RolloutConfig:
    num_generations: int = within("[1, ∞)", 4)
    """Completions sampled from the current policy per prompt at every step (online DPO: best vs worst of
    them; GRPO: the group, G). At least 2 (one completion has no group to compare with), except for PPO (its
    critic is the baseline; 1 is usual). The batch sizes count prompts, so every micro-batch holds whole groups."""
    max_new_tokens: int = within("[1, ∞)", 64)
    """Longest completion, in tokens; a completion cut here has no end-of-sequence token (`finish: length`)."""
    temperature: float = within("(0, ∞)", 1.0)
    """Sampling temperature (> 0). GRPO and PPO divide the training pass's logits by it too, so the ratio
    π/π_old compares the distributions that were sampled."""
    top_p: float = within("(0, 1]", 1.0)
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches `top_p` (1.0: all)."""
    top_k: int = within("[0, ∞)", 0)
    """Keep the `top_k` most likely tokens (0: all)."""
    generation_batch_size: int = within("[1, ∞)", 32)
    """Prompts generated together (memory of the KV cache); does not change the samples, which are seeded
    per prompt and sample."""
    num_iterations: int = within("[1, ∞)", 1)
    """GRPO's μ: optimizer passes over one rollout; > 1 reuses it with π_old stored at sampling time."""
    mask_truncated_completions: bool = False
    """GRPO: completions that hit `max_new_tokens` without an end-of-sequence token get no loss (DAPO)."""
    dynamic_sampling: bool = False
    """GRPO: drop groups whose rewards have zero spread and sample more prompts instead (DAPO), up to
    `max_resample_rounds` extra rounds."""
    max_resample_rounds: int = within("[0, ∞)", 3)
    """Dynamic sampling: at most this many extra generation rounds per step before training on what is there."""
    advantage_estimator: Literal["grpo", "rloo", "reinforce_pp"] = "grpo"
    """Policy-gradient losses: `grpo` (reward minus the group mean, scaled by `scale_rewards`), `rloo` (minus
    the mean of the group's other samples), `reinforce_pp` (group mean removed, then whitened over the batch)."""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """`grpo` advantages divided by the group's reward std (GRPO), the whole batch's (some implementations), or
    not at all (Dr. GRPO)."""
    ppo_epochs: int = within("[1, ∞)", 4)
    """PPO: passes over each rollout buffer, each in `minibatches` shuffled minibatches of one optimizer step:
    a rollout serves ppo_epochs × minibatches steps (fewer after an `early_stop_kl` stop)."""
    minibatches: int = within("[1, ∞)", 1)
    """PPO: minibatches per pass; a rollout holds minibatches × per_device_batch_size ×
    gradient_accumulation_steps × processes prompts, each sampled `num_generations` times."""
    gamma: float = within("[0, 1]", 1.0)
    """PPO: GAE's discount γ over completion tokens (1: the score, which arrives at the last token, counts
    fully at every token)."""
    gae_lambda: float = within("[0, 1]", 0.95)
    """PPO: GAE's λ (1: Monte-Carlo return minus the value; 0: one-step TD error)."""
    whiten_advantages: bool = True
    """PPO: normalize the advantages over the rollout (masked mean 0, std 1); off, the step size follows the
    reward scale, and a warning says so (seed 001 #5)."""
    early_stop_kl: float | None = within("(0, ∞)", None)
    """PPO: end the epochs over a rollout after a step whose approximate KL to the sampling policy (k3, mean
    over its sequences of the token mean, `policy/approx_kl_k3`) exceeds this (e.g. 0.02); None: never."""
    critic: str = "head"
    """PPO's value function V(s_t). `head`: a value head on the policy's own trunk (one model, one optimizer;
    the value loss trains the trunk too); `policy`: a separate critic, a copy of the initial policy with a new
    head; or the path (hub id) of a reward model (`task: reward` output) whose trunk and score head start the
    critic. The critic trains in full (LoRA or not), in the policy's optimizer."""
    critic_learning_rate: float | None = within("(0, ∞)", None)
    """PPO: the critic's peak learning rate (the schedule scales it like the policy's); None:
    `training.learning_rate`. A fresh value head learns slowly at a policy's rate (Adam moves each weight by
    about the rate per step whatever `vf_coef` is), so a higher one is common (OpenRLHF: ~10x)."""


@dataclass
class RewardConfig:
    functions: list[str | dict[str, Any]] = field(default_factory=list)
    """Reward functions `path/to/file.py:fn` or `package.module:fn` (or `{function: ..., name: ..., kwargs:
    {...}}`), called as `fn(prompts=[...], completions=[...], **columns)` and returning one float (or None: no
    score) per completion: TRL's signature, so a TRL reward function works unchanged. Paths are relative to the
    working directory. Built-ins: `preftune.rewards:toy_verifier`, `format_reward`, `exact_answer`,
    `length_penalty` (docs/online_dpo.md)."""
    weights: list[float] | None = within("(-∞, ∞)", None)
    """One weight per function (default 1.0 each); the weighted sum is the reward (a negative weight makes a
    function a penalty)."""
    judge: Any = None
    """Instead of (or besides) functions: a judge config (a YAML path or a mapping; see docs/judges.md) or a
    `--judge` value such as `toy-verifier`. A judge with a score (verifier, reward model, scored LLM judge)
    scores each completion; a pairwise-only judge ranks the samples of a prompt by wins, asked in both orders."""
    judge_mode: Literal["auto", "score", "pairwise"] = "auto"
    """How `judge` rewards: `score` each completion alone (verifiers, reward models, an LLM's 1-10 score),
    or `pairwise`: every two samples of a prompt compared, both orders (a flip is a tie), the reward is the
    number of wins (n·(n−1) judge calls per prompt); `auto`: score when the judge can, else pairwise."""
    min_margin: float = within("[0, ∞)", 0.0)
    """Online DPO: a prompt whose best and worst reward differ by no more than this gives no pair (skipped
    and counted as `rollout/skipped_fraction`); 0 skips exact ties only."""
    missing_eos_penalty: float | None = within("[0, ∞)", None)
    """Subtracted from the reward of a completion that ended without an end-of-sequence token (None: nothing)."""
    overlong_buffer: int | None = within("[1, ∞)", None)
    """DAPO's soft overlong punishment: a completion longer than `rollout.max_new_tokens` − `overlong_buffer`
    tokens loses reward linearly with its excess, down to −`overlong_penalty` at `max_new_tokens` (None: off)."""
    overlong_penalty: float = within("[0, ∞)", 1.0)
    """The largest soft overlong punishment, reached at `rollout.max_new_tokens` (DAPO: 1)."""


@dataclass
class Config:
    model: Any = REQUIRED
    """Policy to tune, or the base of a reward model: hub id or local path (or, from Python, a loaded
    `PreTrainedModel`)."""
    task: Literal["policy", "reward"] = "policy"
    """`policy`: tune a causal LM on preferences; `reward`: train a reward model (a one-output
    sequence-classification head on any causal LM or encoder; loss `bradley_terry`; see docs/reward_models.md)."""
    tokenizer: Any = None
    """Tokenizer id or path (default: the model's); from Python, a loaded tokenizer."""
    model_dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Dtype of the model weights (policy, reference and reward model): `bf16` / `fp16` halve their memory and
    run every product in that dtype, while the optimizer keeps fp32 master weights (`training.master_weights`);
    the saved model keeps this dtype, as Hugging Face does. `bf16` on a CPU without native bf16 is refused
    unless `training.allow_slow_bf16`; `fp16` needs LoRA (full fine-tuning in fp16 needs loss scaling, which
    preftune does not do). A model passed from Python is cast to it. Under DeepSpeed or FSDP keep fp32 and set
    the engine's `mixed_precision: bf16`: the engine keeps the fp32 masters itself."""
    attn_implementation: str | None = None
    """Attention kernel for `from_pretrained` (`sdpa`, `eager`, `flash_attention_2`, ...); None: the model's
    default. `flash_attention_2` takes no 4-D mask: use it with `engine.layout: padded`."""
    trust_remote_code: bool = False
    """Let `from_pretrained` run code shipped with the model and tokenizer on the hub (some architectures need
    it); off because it executes that code."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) of `model`, and of the tokenizer when it is the model's; None: the
    default branch."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training and evaluation data."""
    loss: LossConfig = field(default_factory=LossConfig)
    """The objective."""
    lora: LoraConfig | None = None
    """LoRA adapter settings; absent means full fine-tuning."""
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    """Reference model and its log-prob cache."""
    engine: EngineConfig = field(default_factory=EngineConfig)
    """Speed and memory options of the log-prob engine."""
    training: TrainingConfig = field(default_factory=TrainingConfig)
    """Optimisation, schedule, checkpoints."""
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    """Health checks, KL, alarms, samples and early stopping during training."""
    rollout: RolloutConfig | None = None
    """On-policy sampling: present, the run generates from the current policy every step (online DPO with a
    paired loss, GRPO with a policy-gradient loss) or every rollout (PPO); `training.per_device_batch_size`
    then counts prompts."""
    reward: RewardConfig | None = None
    """How on-policy samples are scored (reward functions and / or a judge); required with `rollout`."""


# ----------------------------------------------------------------------------------------------------------------
# Reading


def _known_keys() -> list[str]:
    """Every dotted key a config may hold, loss hyperparameters of every registered loss included."""
    keys = [key for key, *_ in field_docs() if not key.endswith(">")]
    return keys + [f"loss.{hp}" for hp in loss_takers()]


_READER = Reader(_known_keys, {k: f"'{k}' is TRL's name, use {v}" for k, v in TRL_NAMES.items()})


def to_config(source: Config | dict | str | Path, overrides: list[str] | dict | None = None, *,
              log: Callable[[str], None] = print) -> Config:
    """Build a checked :class:`Config` from a Config, a dict or a YAML path, with optional overrides.

    Every problem (unknown key, type, range, a check of :func:`validate`) is collected and raised as one
    :class:`~preftune.errors.ConfigError`. ``log`` prints the notice of :func:`_switch_loss`.
    """
    if isinstance(source, Config):
        tree = shallow(source)  # not dataclasses.asdict: it would deep-copy a loaded model or dataset
    elif isinstance(source, dict):
        tree = source
    else:
        tree = load_yaml(source)
    if overrides:
        extra = overrides if isinstance(overrides, dict) else parse_overrides(list(overrides))
        tree = merge(_switch_loss(tree, extra, log), extra)
    problems = Problems()
    config = _READER.build(Config, tree, "", problems)
    run_checks(config, problems, _READER)
    problems.raise_if_any()
    return config


def _switch_loss(tree: dict, extra: dict, log: Callable[[str], None]) -> dict:
    """An override of ``loss.name`` over a file written for another loss: the file's hyperparameters that the
    old loss takes and the new one does not are dropped, named in one notice (they belonged to the old method);
    the file's ``weights`` too when their count no longer fits. Keys the override itself gives are never dropped:
    one the new loss does not take is refused like any unknown key."""
    new_loss, old_loss = extra.get("loss"), tree.get("loss")
    if not (isinstance(new_loss, dict) and "name" in new_loss and isinstance(old_loss, dict)):
        return tree
    old = old_loss.get("name") or DEFAULT_LOSS.get(extra.get("task", tree.get("task", "policy")))
    old_takes, new_takes = taken_by(old), taken_by(new_loss["name"])
    if old_takes is None or new_takes is None or loss_names(old) == loss_names(new_loss["name"]):
        return tree  # an unknown loss name is reported by validate; the same loss drops nothing
    fixed = {f.name for f in dataclasses.fields(LossConfig) if not f.metadata.get("rest")}
    dropped = [k for k in old_loss if k not in fixed and k not in new_loss and k in old_takes and k not in new_takes]
    weights = old_loss.get("weights")
    if "weights" not in new_loss and isinstance(weights, list) and len(weights) != len(loss_names(new_loss["name"])):
        dropped.append("weights")
    if not dropped:
        return tree
    new_name = "/".join(loss_names(new_loss["name"]))
    log(f"note: loss.name={new_name} replaces {'/'.join(loss_names(old))}: dropped "
        f"{', '.join(f'loss.{k}' for k in dropped)} from the config (set for {'/'.join(loss_names(old))}, "
        f"not taken by {new_name})")
    return {**tree, "loss": {k: v for k, v in old_loss.items() if k not in dropped}}


def field_docs(cls: type | None = None, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted key, type with its range, default, doc) for every field, read from the string under each field."""
    return _reader_field_docs(Config if cls is None else cls, prefix)


def validate(config: Config) -> None:
    """The checks across fields (``config_checks``) on a built config; ``to_config`` runs them too. Fills
    ``loss.name`` when None. Raises one ConfigError listing every problem; types and ranges are ``to_config``'s."""
    problems = Problems()
    run_checks(config, problems, _READER)
    problems.raise_if_any()


def check_loss_params(config: Config) -> None:
    """The checks of :func:`validate`; kept for callers written before ``to_config`` ran them itself."""
    validate(config)
