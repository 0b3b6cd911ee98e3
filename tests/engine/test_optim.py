"""Lookahead optimizer: the update rule, training, and exact resumption from a state dict."""

from __future__ import annotations

import io

import pytest
import torch

from napari_medseg.engine.training.optim import Lookahead, lookahead_nadam


def test_lookahead_follows_the_update_rule_with_sgd():
    """k=3, alpha=0.5 around plain SGD on f(w) = w^2 / 2 (gradient w), simulated by hand."""
    w = torch.nn.Parameter(torch.tensor([4.0]))
    opt = Lookahead(torch.optim.SGD([w], lr=0.1), k=3, alpha=0.5)
    fast, slow = 4.0, 4.0
    for step in range(1, 8):
        opt.zero_grad()
        (w**2 / 2).sum().backward()
        opt.step()
        fast -= 0.1 * fast
        if step % 3 == 0:
            slow += 0.5 * (fast - slow)
            fast = slow
        assert w.item() == pytest.approx(fast, rel=1e-6), step


def test_lookahead_nadam_trains_and_shares_the_learning_rate():
    torch.manual_seed(0)
    x = torch.randn(64, 3)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]]) + 0.3
    model = torch.nn.Linear(3, 1)
    opt = lookahead_nadam(model.parameters(), lr=0.05)
    assert isinstance(opt, torch.optim.Optimizer) and isinstance(opt.optimizer, torch.optim.NAdam)
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]
    for group in opt.param_groups:  # what the trainer does each epoch
        group["lr"] = 0.01
    assert opt.optimizer.param_groups[0]["lr"] == 0.01


def _train(model, opt, steps, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(8, 4, generator=g)
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()


def test_state_dict_round_trip_resumes_exactly():
    torch.manual_seed(1)
    a = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    opt_a = lookahead_nadam(a.parameters(), lr=1e-2)
    _train(a, opt_a, 7, seed=0)  # mid-way through a k=5 cycle
    buf = io.BytesIO()
    torch.save({"model": a.state_dict(), "opt": opt_a.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)  # what checkpoints allow
    b = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    b.load_state_dict(saved["model"])
    opt_b = lookahead_nadam(b.parameters(), lr=1e-2)
    opt_b.load_state_dict(saved["opt"])
    assert opt_b.step_count == 7
    _train(a, opt_a, 6, seed=1)
    _train(b, opt_b, 6, seed=1)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, atol=0, rtol=0)
    fresh = lookahead_nadam(b.parameters(), lr=1e-2)
    with pytest.raises(ValueError, match="Lookahead state"):
        fresh.load_state_dict(opt_a.optimizer.state_dict())


@pytest.mark.parametrize("k, alpha", [(0, 0.5), (5, 0.0), (5, 1.5)])
def test_invalid_settings(k, alpha):
    with pytest.raises(ValueError, match="Lookahead"):
        Lookahead(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1), k=k, alpha=alpha)
