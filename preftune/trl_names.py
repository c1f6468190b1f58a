"""Where TRL's configuration names live in preftune: the pointers an unknown key's error gives.

Only names with no key of the same name here are listed: a TRL name that is also ours (``learning_rate``,
``beta``, ``max_length``, ``gradient_checkpointing``, ...) is found in its section by name. The README's
"Coming from TRL" table shows both kinds and says why preftune refuses these names instead of accepting them.
"""

TRL_NAMES: dict[str, str] = {
    "per_device_train_batch_size": "'training.per_device_batch_size' (with a `rollout:` it counts prompts, each "
                                   "with its whole group; GRPOTrainer's counts completions)",
    "num_train_epochs": "'training.num_epochs'",
    "save_steps": "'training.save_every'",
    "save_strategy": "'training.save_every' (0: no checkpoints)",
    "eval_steps": "'training.eval_every'",
    "eval_strategy": "'training.eval_every' (0: only at the end)",
    "logging_steps": "'training.logging_every'",
    "lr_scheduler_type": "'training.lr_scheduler'",
    "warmup_steps": "'training.warmup_ratio' (a fraction of the steps)",
    "adam_beta1": "'training.adam_betas: [beta1, beta2]'",
    "adam_beta2": "'training.adam_betas: [beta1, beta2]'",
    "bf16": "'training.precision: bf16'",
    "fp16": "'model_dtype: fp16' (fp16 weights, with LoRA; compute precision is 'training.precision': fp32 or bf16)",
    "torch_dtype": "'model_dtype' (fp32, bf16 or fp16)",
    "dtype": "'model_dtype' (fp32, bf16 or fp16)",
    "model_revision": "'revision'",
    "load_in_4bit": "'lora.quantization: 4bit'",
    "load_in_8bit": "'lora.quantization: 8bit'",
    "dataset_num_proc": "'data.num_proc'",
    "dataset_config": "'data.train' as name:subset:split (or {path, name, split})",
    "dataset_train_split": "'data.train' as name:split (or {path, split})",
    "max_completion_length": "'training.max_length' (prompt + response) or, for on-policy sampling (GRPO), "
                             "'rollout.max_new_tokens'",
    "loss_type": "'loss.name' (TRL's 'sigmoid' is 'dpo'; GRPOTrainer's loss_type is 'loss.aggregation')",
    "importance_sampling_level": "'loss.importance_sampling'",
    "reward_funcs": "'reward.functions'",
    "reward_weights": "'reward.weights'",
    "loss_weights": "'loss.weights'",
    "precompute_ref_log_probs": "'reference.precompute'",
    "model_name_or_path": "'model'",
    "dataset_name": "'data.train'",
    "use_peft": "a 'lora:' section (absent: full fine-tuning)",
    "lora_r": "'lora.r'",
    "lora_alpha": "'lora.alpha'",
    "lora_dropout": "'lora.dropout'",
    "lora_target_modules": "'lora.target_modules'",
    "load_best_model_at_end": "'monitor.save_best'",
    "metric_for_best_model": "'monitor.early_stopping_metric'",
    "greater_is_better": "'monitor.early_stopping_mode'",
    "early_stopping_patience": "'monitor.patience'",
    "resume_from_checkpoint": "'preftune train --resume'",
    "per_device_eval_batch_size": "nothing: evaluation batches are 2 x 'training.per_device_batch_size'",
}
"""TRL name -> where it lives here (the words after "use" in the error)."""
