"""Reference log-probs, computed once and cached on disk.

The cache key covers everything the numbers depend on: the reference weights (hashed in full), the token ids
of every example, the tokenization rules and the precision. A changed model or data gives a new key; a stale
hit is impossible short of a hash collision.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import torch
from torch import nn

from preftune.data.tokenize import TokenizedPair
from preftune.fsio import write_error

CACHE_VERSION = "1"


def default_cache_dir() -> Path:
    return Path(os.environ.get("PREFTUNE_CACHE", Path.home() / ".cache" / "preftune")) / "reference"


def model_fingerprint(model: nn.Module) -> str:
    """Hash of the model config and every non-adapter weight and buffer (name, shape, dtype, bytes).

    The config matters as much as the weights: the same weights under another ``rope_theta`` give other
    log-probs; buffers (rotary tables) likewise.
    """
    h = hashlib.blake2b(digest_size=16)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_json_string"):
        h.update(config.to_json_string(use_diff=False).encode())
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    for name, p in sorted(tensors, key=lambda kv: kv[0]):
        if "lora_" in name:
            continue
        t = _whole(p)
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _whole(p: torch.Tensor) -> torch.Tensor:
    """A weight's full value on CPU, also when DeepSpeed ZeRO-3 holds only this process's partition of it
    (gathered for the hash: the empty local tensor would make every model hash alike)."""
    if hasattr(p, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([p]):
            return p.detach().contiguous().cpu().clone()
    return p.detach().contiguous().cpu()


def examples_fingerprint(examples: list) -> str:
    h = hashlib.blake2b(digest_size=16)
    for e in examples:
        if isinstance(e, TokenizedPair):
            parts = (e.prompt_ids, e.chosen_ids, e.rejected_ids)
        else:
            parts = (e.prompt_ids, e.completion_ids)
        for ids in parts:
            h.update(len(ids).to_bytes(4, "little"))
            h.update(torch.tensor(ids, dtype=torch.int64).numpy().tobytes())
    return h.hexdigest()


def cache_key(model_fp: str, examples: list, tokenization_fp: str, precision: str) -> str:
    text = "|".join((CACHE_VERSION, model_fp, examples_fingerprint(examples), tokenization_fp, precision))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def compute_reference_logps(logp_fn, examples: list, batch_fn, batch_size: int,
                            indices: list[int] | None = None) -> torch.Tensor:
    """Reference log-probs for ``examples`` (or the given subset), longest first so that batches are tight.

    ``logp_fn(batch) -> (logps (S,), lengths (S,))`` must already run in reference mode.
    Returns (n, 2) [chosen, rejected] for pairs or (n,) for singles, rows in ``indices`` order.
    """
    idx = list(range(len(examples))) if indices is None else list(indices)
    paired = bool(examples) and isinstance(examples[0], TokenizedPair)
    out = torch.zeros((len(idx), 2) if paired else (len(idx),), dtype=torch.float32)
    pos: dict[int, int] = {}
    for k, i in enumerate(idx):
        pos.setdefault(i, k)  # a repeated index (padding) rewrites its first row

    def size(i):
        e = examples[i]
        return len(e.prompt_ids) + (max(len(e.chosen_ids), len(e.rejected_ids)) if paired else len(e.completion_ids))

    order = sorted(idx, key=size, reverse=True)
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            logps, _ = logp_fn(batch_fn(chunk))
            logps = logps.float().cpu()
            rows = torch.tensor([pos[i] for i in chunk])
            if paired:
                out[rows] = torch.stack([logps[: len(chunk)], logps[len(chunk) :]], dim=1)
            else:
                out[rows] = logps[: len(chunk)]
    return out


def load_cached(cache_dir: Path, key: str, n: int) -> torch.Tensor | None:
    path = cache_dir / f"{key}.pt"
    if not path.exists():
        return None
    try:
        data = torch.load(path)
    except Exception:  # a corrupt file is a miss, never an error
        return None
    return data if data.shape[0] == n else None


def store_cached(cache_dir: Path, key: str, logps: torch.Tensor) -> None:
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f".{key}.{os.getpid()}.tmp"
    try:
        torch.save(logps, tmp)
        os.replace(tmp, cache_dir / f"{key}.pt")
    finally:
        tmp.unlink(missing_ok=True)


def reference_logps(source: nn.Module, dataset, *, cfg, tokenization_fp: str, pad_id: int, autocast, accelerator,
                    say, name: str, engine: nn.Module | None = None) -> torch.Tensor | None:
    """Reference log-probs of every example of ``dataset`` (an ExampleSet): from the disk cache, or computed
    now, sharded over processes, and cached. ``source`` is the reference model (the policy itself before the
    first step). Returns (n, 2) for pairs or (n,) for singles; None for an empty set.

    ``engine``: the prepared scoring module to run instead of a fresh ``LogpModel(source)`` (DeepSpeed ZeRO-3,
    where only the engine gathers the partitioned weights); every process then runs the same number of
    batches (its share padded with repeats of its first example), since each forward is a collective."""
    from preftune.logprobs import LogpModel
    from preftune.models import reference_mode

    if not len(dataset):
        return None
    cache_dir = Path(cfg.reference.cache_dir) if cfg.reference.cache_dir else default_cache_dir()
    key = cache_key(model_fingerprint(source), dataset.examples, tokenization_fp, cfg.training.precision)
    cached = load_cached(cache_dir, key, len(dataset))
    if cached is not None:
        say(f"reference log-probs ({name}): cache hit {key}")
        return cached
    t0 = time.perf_counter()
    # eager: one no-grad pass rarely repays a compilation
    logp = engine if engine is not None else LogpModel(source, cfg.engine.chunk_size)
    world, rank = accelerator.num_processes, accelerator.process_index
    mine = list(range(rank, len(dataset), world))
    real = len(mine)
    if engine is not None and world > 1:
        mine += (mine[:1] or [0]) * (-(-len(dataset) // world) - len(mine))  # the same batch count everywhere

    def batch_fn(indices):
        return dataset.batch(indices, pad_id, cfg.engine.layout, with_ref=False).to(accelerator.device)

    def logp_fn(batch):
        return logp(*batch.model_args())

    with reference_mode(source), autocast():
        part = compute_reference_logps(logp_fn, dataset.examples, batch_fn,
                                       max(1, cfg.training.per_device_batch_size * 2), mine)
    part, mine = part[:real], mine[:real]  # the padding's rows
    if world > 1:
        import torch.distributed as dist

        parts = [None] * world
        dist.all_gather_object(parts, (mine, part))
        values = torch.zeros((len(dataset), *part.shape[1:]))
        for idx, vals in parts:
            values[torch.tensor(idx, dtype=torch.long)] = vals
    else:
        values = part
    if accelerator.is_main_process:
        try:
            store_cached(cache_dir, key, values)
        except (OSError, RuntimeError) as e:  # the cache only saves time: a full disk must not stop the run
            error = write_error(e, "the reference cache", cache_dir)
            if error is None:
                raise
            say(f"warning: {error}; continuing without caching")
    say(f"reference log-probs ({name}): computed for {len(dataset)} examples in {time.perf_counter() - t0:.1f}s, "
        f"cached as {key}")
    return values
