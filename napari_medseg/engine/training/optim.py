"""Optimizers beyond ``torch.optim``: Lookahead, used with NAdam by the cross-dimensional models.

Zhang et al., "Lookahead Optimizer: k steps forward, 1 step back", NeurIPS 2019
(arXiv:1907.08610). The inner ("fast") optimizer takes ``k`` steps; then the slow weights move a
fraction ``alpha`` towards the fast ones and the fast weights restart from there:
``slow += alpha * (fast - slow); fast = slow``. Messaoudi et al. (Medical Image Analysis 88:102868,
2023) train Omnia-Net, DX-Net and DS-Net with Lookahead around NAdam.
"""

from __future__ import annotations

from typing import Any

import torch


class Lookahead(torch.optim.Optimizer):
    """Lookahead wrapper around any ``torch.optim`` optimizer.

    ``param_groups`` are the inner optimizer's own (shared, so learning-rate changes reach it) and
    ``state`` holds the slow weights. :meth:`state_dict` / :meth:`load_state_dict` carry the
    inner optimizer's state, the slow weights and the step counter, in plain types and tensors,
    so a checkpoint resumes exactly.

    Args:
        optimizer: The inner optimizer.
        k: Inner steps between two synchronisations.
        alpha: Slow-weight step size in ``(0, 1]``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, k: int = 5, alpha: float = 0.5):
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"Lookahead k must be a positive int, got {k!r}.")
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"Lookahead alpha must be in (0, 1], got {alpha!r}.")
        # Not calling Optimizer.__init__: the parameter groups belong to the inner optimizer.
        self.optimizer = optimizer
        self.k = k
        self.alpha = alpha
        self.defaults = optimizer.defaults
        self.state: dict = {}
        self.step_count = 0

    @property
    def param_groups(self) -> list[dict]:  # the inner optimizer's list (it may replace it on load)
        return self.optimizer.param_groups

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def _sync(self) -> None:
        for p in self._params():
            slow = self.state.setdefault(p, {}).get("slow")
            if slow is None:  # the slow weights start where the fast ones were k steps ago
                continue
            slow.add_(p.detach() - slow, alpha=self.alpha)
            p.copy_(slow)

    @torch.no_grad()
    def _init_slow(self) -> None:
        for p in self._params():
            st = self.state.setdefault(p, {})
            if "slow" not in st:
                st["slow"] = p.detach().clone()

    def step(self, closure: Any = None) -> Any:
        """One inner step; every ``k``-th step also moves the slow weights and resets the fast."""
        self._init_slow()
        if closure is None:
            loss = self.optimizer.step()
        else:
            with torch.enable_grad():
                loss = self.optimizer.step(closure)
        self.step_count += 1
        if self.step_count % self.k == 0:
            self._sync()
        return loss

    def state_dict(self) -> dict:
        params = self._params()
        slow = {i: self.state[p]["slow"].clone() for i, p in enumerate(params) if "slow" in self.state.get(p, {})}
        return {
            "inner": self.optimizer.state_dict(),
            "lookahead": {"k": self.k, "alpha": self.alpha, "step_count": self.step_count, "slow": slow},
        }

    def load_state_dict(self, state_dict: dict) -> None:
        if "inner" not in state_dict or "lookahead" not in state_dict:
            raise ValueError("Not a Lookahead state dict (needs 'inner' and 'lookahead' entries).")
        self.optimizer.load_state_dict(state_dict["inner"])
        la = state_dict["lookahead"]
        params = self._params()
        slow = {int(i): v for i, v in la.get("slow", {}).items()}
        if slow and max(slow) >= len(params):
            raise ValueError(f"The Lookahead state has slow weights for {max(slow) + 1} parameters; "
                             f"this optimizer has {len(params)}.")
        self.k = int(la["k"])
        self.alpha = float(la["alpha"])
        self.step_count = int(la["step_count"])
        self.state = {}
        for i, p in enumerate(params):
            if i in slow:
                if slow[i].shape != p.shape:
                    raise ValueError(f"Lookahead slow weight {i} has shape {tuple(slow[i].shape)}, "
                                     f"the parameter {tuple(p.shape)}.")
                self.state[p] = {"slow": slow[i].to(device=p.device, dtype=p.dtype).clone()}

    def __repr__(self) -> str:
        return f"Lookahead(k={self.k}, alpha={self.alpha}, {self.optimizer!r})"


def lookahead_nadam(params, lr: float, weight_decay: float = 0.0, k: int = 5, alpha: float = 0.5) -> Lookahead:
    """``Lookahead(NAdam(params, lr, weight_decay), k, alpha)``: the cross-dimensional models' recipe."""
    return Lookahead(torch.optim.NAdam(params, lr=lr, weight_decay=weight_decay), k=k, alpha=alpha)


def make_optimizer(params, config) -> torch.optim.Optimizer:
    """The optimiser ``config.optimizer`` names (``sgd``: nesterov with ``momentum``; ``adam``;
    ``lookahead_nadam``) over ``params`` at ``config.lr`` and ``config.weight_decay``.

    Raises:
        ValueError: an unknown optimiser name.
    """
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay, nesterov=True
        )
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "lookahead_nadam":  # the cross-dimensional models' recipe
        return lookahead_nadam(params, lr=config.lr, weight_decay=config.weight_decay)
    raise ValueError(f"Unknown optimizer {config.optimizer!r}; use 'sgd', 'adam' or 'lookahead_nadam'.")
