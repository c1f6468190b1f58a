"""preftune's AdamW: torch's update bit for bit, with gradients and moments allocated once."""

from __future__ import annotations

import torch

from preftune.trainer.optim import AdamW


def _train(kind, steps: int = 3, accum: int = 2) -> list[torch.Tensor]:
    """A two-layer model plus a layer that never gets a gradient, AdamW with weight decay 0.1: if the idle
    layer were stepped with a zero gradient instead of skipped, decay would shrink it (w <- w - lr·0.1·w)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    idle = torch.nn.Linear(2, 2)
    params = [*model.parameters(), *idle.parameters()]
    opt = kind(params, lr=1e-2, weight_decay=0.1, foreach=False)
    for _ in range(steps):
        for _ in range(accum):
            model(torch.randn(3, 4)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return [p.detach().clone() for p in params]


def test_adamw_matches_torch_bit_for_bit_with_an_idle_parameter():
    ours, torchs = _train(AdamW), _train(torch.optim.AdamW)
    assert all(torch.equal(a, b) for a, b in zip(ours, torchs, strict=True))


def test_gradients_and_moments_exist_before_the_first_step_and_are_kept():
    layer = torch.nn.Linear(3, 2)
    opt = AdamW(layer.parameters(), lr=1e-3, foreach=False)
    grad = layer.weight.grad
    assert grad is not None and not grad.any()  # zeros, allocated at construction
    state = opt.state[layer.weight]
    assert state["exp_avg"].shape == (2, 3) and state["step"].item() == 0.0
    layer(torch.ones(1, 3)).sum().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    assert layer.weight.grad is grad and not grad.any()  # the same buffer, zeroed in place
    assert opt.state[layer.weight]["exp_avg"] is state["exp_avg"] and state["step"].item() == 1.0


def test_step_hooks_run_once_per_step_also_after_torchs_adamw_was_used():
    """torch patches a class's step with the hook runner at its first instance: had our step called
    super().step(), a user's post-step hook would run twice per step once torch's AdamW had an instance."""
    torch.optim.AdamW([torch.nn.Parameter(torch.ones(1))], lr=1e-3)  # patches torch's AdamW.step
    layer = torch.nn.Linear(2, 1)
    opt, calls = AdamW(layer.parameters(), lr=1e-3, foreach=False), []
    opt.register_step_post_hook(lambda *_: calls.append(1))
    layer(torch.ones(1, 2)).sum().backward()
    opt.step()
    assert calls == [1]
