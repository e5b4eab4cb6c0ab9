"""Local training (a party's update) and validation (the server's loss, accuracy, v_t).

PyTorch stays here and in ``models.py``; everything crosses in and out as named NumPy
arrays. Results are deterministic for the same ``rng`` state, inputs and torch thread
count (the thread count changes the order of floating-point sums).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F  # noqa: N812 - the conventional alias
from torch import nn

from fedgrpc.errors import ConfigError
from fedgrpc.learning.models import set_params
from fedgrpc.types import UpdateKind

log = logging.getLogger(__name__)

Params = Mapping[str, npt.NDArray[Any]]
NamedArrays = dict[str, npt.NDArray[np.float32]]

_TORCH_DTYPE: dict[type[np.generic], torch.dtype] = {
    np.float32: torch.float32,
    np.int64: torch.int64,
}


def local_update(
    model: nn.Module,
    params: Params,
    x: npt.NDArray[np.floating[Any]] | torch.Tensor,
    y: npt.NDArray[np.integer[Any]] | torch.Tensor,
    *,
    kind: UpdateKind | str,
    lr: float,
    local_steps: int,
    local_epochs: int,
    batch_size: int,
    rng: np.random.Generator,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    prox_mu: float = 0.0,
) -> tuple[NamedArrays, float]:
    """Compute one party's update from the global parameters ``params`` (theta_t).

    ``gradient`` (FedSGD): the mean cross-entropy gradient at theta_t over one
    mini-batch of ``batch_size`` samples drawn without replacement by ``rng``
    (``batch_size`` 0 or >= N: all local data, no draw).

    ``delta``: SGD with step ``lr``, for ``local_steps`` steps if > 0 (reshuffling
    with ``rng`` at every pass over the data) else ``local_epochs`` epochs over
    ``rng``-shuffled mini-batches, the last one possibly smaller. ``batch_size`` 0 or
    >= N means full-batch steps, no shuffle. Each step, as torch.optim.SGD (no
    dampening, no Nesterov) on the FedProx loss L(θ) + (μ/2)||θ - θ_t||²::

        d = ∇L(θ) + μ (θ - θ_t) + weight_decay · θ
        b = d (first step), else b = momentum · b + d
        θ = θ - lr · b

    The momentum buffer starts empty every round: each round's training starts
    afresh from θ_t. Frozen parameters (``requires_grad`` False) never move.

    Args:
        model: Module whose parameters are overwritten with ``params``; afterwards it
            holds theta_t (gradient) or theta_local (delta).
        params: Global parameters theta_t by name.
        x: Local samples ``(N, *input_shape)``, float32 preferred (used without copy).
        y: Local labels ``(N,)``.
        kind: ``gradient`` or ``delta``.
        lr: Local SGD step size (delta only).
        local_steps: SGD steps (delta); 0 means use ``local_epochs``.
        local_epochs: Epochs when ``local_steps`` is 0 (delta).
        batch_size: Mini-batch size; 0 means the whole local data set.
        rng: Source of every sample choice.
        momentum: SGD momentum in [0, 1) (delta only; 0 = off).
        weight_decay: L2 weight decay >= 0 (delta only; 0 = off).
        prox_mu: FedProx proximal coefficient mu >= 0 (delta only; 0 = off).

    Returns:
        ``(update, loss)``: float32 arrays in parameter order, the gradient g or
        ``theta_t - theta_local``; and the mini-batch loss (gradient) or the mean
        training loss over the SGD steps (delta; the data loss, without the
        proximal or decay terms).

    Raises:
        ConfigError: no data, mismatched x/y, or invalid hyperparameters.
    """
    try:
        kind = UpdateKind(kind)
    except ValueError:
        raise ConfigError(
            f"update kind must be 'gradient' or 'delta', got {kind!r}"
        ) from None
    xt, yt = _as_tensor(x, np.float32), _as_tensor(y, np.int64)
    n = int(yt.shape[0])
    if n == 0 or xt.shape[0] != n:
        raise ConfigError(f"local data: {xt.shape[0]} samples but {n} labels")
    if batch_size < 0:
        raise ConfigError(f"batch_size must be >= 0, got {batch_size}")
    bs = n if batch_size == 0 else min(batch_size, n)
    opt = _LocalOptimiser(momentum, weight_decay, prox_mu)
    if kind is UpdateKind.GRADIENT and opt.active:
        raise ConfigError(
            "momentum, weight decay and prox mu apply to delta updates only, got "
            f"{momentum}, {weight_decay} and {prox_mu} for a gradient update"
        )
    set_params(model, params)
    model.train()
    named = list(model.named_parameters())

    if kind is UpdateKind.GRADIENT:
        return _gradient_update(model, named, xt, yt, bs, rng)
    return _delta_update(
        model,
        named,
        xt,
        yt,
        bs,
        lr=lr,
        local_steps=local_steps,
        local_epochs=local_epochs,
        rng=rng,
        opt=opt,
    )


class _LocalOptimiser:
    """Momentum, weight decay and FedProx's proximal term of one round's local SGD.

    Raises:
        ConfigError: a value that is not finite, negative, or momentum >= 1.
    """

    def __init__(self, momentum: float, weight_decay: float, prox_mu: float) -> None:
        for name, value in (
            ("momentum", momentum),
            ("weight_decay", weight_decay),
            ("prox_mu", prox_mu),
        ):
            if not np.isfinite(value) or value < 0:
                raise ConfigError(f"{name} must be a finite number >= 0, got {value}")
        if momentum >= 1:
            raise ConfigError(f"momentum must lie in [0, 1), got {momentum}")
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.prox_mu = prox_mu
        self.active = bool(momentum or weight_decay or prox_mu)

    def step(
        self,
        params: list[nn.Parameter],
        grads: list[torch.Tensor],
        theta_t: list[torch.Tensor],
        buffers: list[torch.Tensor | None],
        lr: float,
    ) -> None:
        """One SGD step in place; ``buffers`` holds the momentum state (None = new)."""
        with torch.no_grad():
            for i, (p, g, t0) in enumerate(zip(params, grads, theta_t, strict=True)):
                if not p.requires_grad:
                    continue
                d = g
                if self.prox_mu:
                    d = d + self.prox_mu * (p - t0)  # FedProx: grad of (mu/2)||p-t0||^2
                if self.weight_decay:
                    d = d + self.weight_decay * p
                if self.momentum:
                    b = buffers[i]
                    if b is None:
                        b = d.clone()  # torch.optim.SGD: the first step seeds it
                    else:
                        b.mul_(self.momentum).add_(d)
                    buffers[i] = d = b
                p.sub_(d, alpha=lr)  # theta <- theta - lr * d


def _gradient_update(
    model: nn.Module,
    named: list[tuple[str, nn.Parameter]],
    xt: torch.Tensor,
    yt: torch.Tensor,
    bs: int,
    rng: np.random.Generator,
) -> tuple[NamedArrays, float]:
    """FedSGD: the loss gradient at the current parameters over one mini-batch."""
    n = int(yt.shape[0])
    if bs < n:
        idx = torch.from_numpy(rng.choice(n, size=bs, replace=False))
        xb, yb = xt[idx], yt[idx]
    else:
        xb, yb = xt, yt
    loss = F.cross_entropy(model(xb), yb)
    grads = _grads(loss, [p for _, p in named])
    update = {name: _to_numpy(g) for (name, _), g in zip(named, grads, strict=True)}
    return update, float(loss.item())


def _delta_update(
    model: nn.Module,
    named: list[tuple[str, nn.Parameter]],
    xt: torch.Tensor,
    yt: torch.Tensor,
    bs: int,
    *,
    lr: float,
    local_steps: int,
    local_epochs: int,
    rng: np.random.Generator,
    opt: _LocalOptimiser,
) -> tuple[NamedArrays, float]:
    """Local SGD from the current parameters; ``theta_t - theta_local`` and mean loss.

    Raises:
        ConfigError: ``lr`` not positive, or neither steps nor epochs to run.
    """
    if not lr > 0:
        raise ConfigError(f"lr must be positive, got {lr}")
    if local_steps < 0 or (local_steps == 0 and local_epochs < 1):
        raise ConfigError(
            f"need local_steps >= 1 or local_epochs >= 1, got {local_steps} and "
            f"{local_epochs}"
        )
    n = int(yt.shape[0])
    theta_t = [p.detach().clone() for _, p in named]
    plist = [p for _, p in named]
    buffers: list[torch.Tensor | None] = [None] * len(plist)
    losses: list[float] = []
    for batch in _batches(n, bs, local_steps, local_epochs, rng):
        xb, yb = (xt, yt) if batch is None else (xt[batch], yt[batch])
        loss = F.cross_entropy(model(xb), yb)
        grads = _grads(loss, plist)
        opt.step(plist, grads, theta_t, buffers, lr)
        losses.append(float(loss.item()))
    update = {
        name: _to_numpy(t0 - p.detach())  # Delta = theta_t - theta_local
        for (name, p), t0 in zip(named, theta_t, strict=True)
    }
    log.debug("delta update: %d steps, mean loss %.4f", len(losses), np.mean(losses))
    return update, float(np.mean(losses))


def _batches(
    n: int, bs: int, steps: int, epochs: int, rng: np.random.Generator
) -> Iterator[torch.Tensor | None]:
    """Mini-batch index tensors for local SGD; ``None`` means the whole data set."""
    if bs >= n:
        for _ in range(steps if steps > 0 else epochs):
            yield None
        return
    done = 0
    epoch = 0
    while (steps > 0 and done < steps) or (steps == 0 and epoch < epochs):
        perm = torch.from_numpy(rng.permutation(n))
        for start in range(0, n, bs):
            yield perm[start : start + bs]
            done += 1
            if steps > 0 and done == steps:
                return
        epoch += 1


class Evaluator:
    """Validation loss, accuracy and loss gradient on a fixed validation set.

    The model is switched to eval mode and its parameters are overwritten by each call.
    """

    def __init__(
        self,
        model: nn.Module,
        x_val: npt.NDArray[np.floating[Any]],
        y_val: npt.NDArray[np.integer[Any]],
        batch_size: int = 2048,
    ) -> None:
        self._x_np = np.ascontiguousarray(x_val, dtype=np.float32)  # (N, *input_shape)
        self._y_np = np.ascontiguousarray(y_val, dtype=np.int64)  # (N,)
        n = int(self._y_np.shape[0])
        if n == 0 or self._x_np.shape[0] != n:
            raise ConfigError(
                f"validation set: {self._x_np.shape[0]} samples but {n} labels"
            )
        if batch_size < 1:
            raise ConfigError(f"evaluation batch_size must be >= 1, got {batch_size}")
        self._model = model
        self._x = _as_tensor(self._x_np, np.float32)
        self._y = _as_tensor(self._y_np, np.int64)
        self._n = n
        self._batch_size = batch_size
        self._digest: str | None = None

    def __len__(self) -> int:
        return self._n

    def evaluate(self, params: Params) -> tuple[float, float]:
        """Mean cross-entropy loss and accuracy of ``params`` on the validation set."""
        set_params(self._model, params)
        self._model.train(False)  # eval mode (no dropout/batch-norm updates)
        loss_sum = 0.0
        correct = 0
        with torch.no_grad():
            for xb, yb in self._chunks():
                logits = self._model(xb)
                loss_sum += float(F.cross_entropy(logits, yb, reduction="sum").item())
                correct += int((logits.argmax(dim=1) == yb).sum().item())
        return loss_sum / self._n, correct / self._n

    def gradient(self, params: Params) -> tuple[NamedArrays, float, float]:
        """The validation-loss gradient v_t at ``params`` (DESIGN §4), loss, accuracy.

        v_t is the gradient of the MEAN loss over all N samples: per-batch gradients
        of the summed loss are added up and divided by N once, so the result does not
        depend on ``batch_size``.
        """
        set_params(self._model, params)
        self._model.train(False)  # eval mode (no dropout/batch-norm updates)
        named = list(self._model.named_parameters())
        plist = [p for _, p in named]
        if self._n <= self._batch_size:
            # One batch: its gradient divided by N in place; no accumulators, no
            # float64 copies (at 10 M parameters that is 4 model-sized buffers less).
            logits = self._model(self._x)
            loss = F.cross_entropy(logits, self._y, reduction="sum")
            grads = [g.div_(self._n) for g in _grads(loss, plist)]
            correct = int((logits.detach().argmax(dim=1) == self._y).sum().item())
            return (
                {
                    name: g.numpy() if g.dtype == torch.float32 else _to_numpy(g)
                    for (name, _), g in zip(named, grads, strict=True)
                },
                float(loss.item()) / self._n,
                correct / self._n,
            )
        # float64 accumulators: many batches of float32 partial sums.
        acc = [torch.zeros(p.shape, dtype=torch.float64) for p in plist]
        loss_sum = 0.0
        correct = 0
        for xb, yb in self._chunks():
            logits = self._model(xb)
            loss = F.cross_entropy(logits, yb, reduction="sum")
            for a, g in zip(acc, _grads(loss, plist), strict=True):
                a += g.to(torch.float64)
            loss_sum += float(loss.item())
            correct += int((logits.detach().argmax(dim=1) == yb).sum().item())
        grads64 = {
            name: _to_numpy(a.div_(self._n))
            for (name, _), a in zip(named, acc, strict=True)
        }
        return grads64, loss_sum / self._n, correct / self._n

    def digest(self) -> str:
        """Hex SHA-256 of the validation bytes (x then y), for provenance."""
        if self._digest is None:
            h = hashlib.sha256()
            h.update(self._x_np.data)
            h.update(self._y_np.data)
            self._digest = h.hexdigest()
        return self._digest

    def _chunks(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, self._n, self._batch_size):
            stop = start + self._batch_size
            yield self._x[start:stop], self._y[start:stop]


def _grads(loss: torch.Tensor, params: list[nn.Parameter]) -> list[torch.Tensor]:
    """Gradient of ``loss`` per parameter; zeros for frozen or unused parameters."""
    trainable = [p for p in params if p.requires_grad]
    if not trainable:
        return [torch.zeros_like(p) for p in params]
    found = iter(torch.autograd.grad(loss, trainable, allow_unused=True))
    out: list[torch.Tensor] = []
    for p in params:
        g = next(found) if p.requires_grad else None
        out.append(torch.zeros_like(p) if g is None else g)
    return out


def _as_tensor(
    a: npt.NDArray[Any] | torch.Tensor, dtype: type[np.generic]
) -> torch.Tensor:
    """A CPU tensor sharing memory with ``a`` when it already has ``dtype``."""
    if isinstance(a, torch.Tensor):
        return a.to(_TORCH_DTYPE[dtype])
    arr = np.ascontiguousarray(a, dtype=dtype)
    if not arr.flags.writeable:
        arr = arr.copy()  # torch cannot wrap read-only memory
    return torch.from_numpy(arr)


def _to_numpy(t: torch.Tensor) -> npt.NDArray[np.float32]:
    """A C-contiguous float32 NumPy copy of a tensor."""
    return np.array(
        t.detach().to("cpu", torch.float32).numpy(), dtype=np.float32, copy=True
    )
