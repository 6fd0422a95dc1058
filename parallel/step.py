"""One optimizer step of a language model through a DeepSpeed engine, and evaluation."""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy, computed in fp32 whatever the compute dtype."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def logsumexp(logits: torch.Tensor) -> torch.Tensor:
    """log Σ exp over the vocabulary (the last dim), in fp32."""
    return torch.logsumexp(logits.float(), dim=-1)


class ModelLoss:
    """The loss over a model's declared outputs: logits, or `(logits, aux)` in training when the arch
    declares `ModelSpec.aux_loss` — then loss_fn(logits) + aux_loss(aux). With a z-loss coefficient
    (`ModelSpec.z_loss`), where gradients flow (training, not evaluation) it adds
    coef · mean(logsumexp(logits)²), `lse` being the layout's logsumexp (vocab-parallel under TP).
    Records each aux/z term, which the training loop takes for logging (`take_aux_terms`)."""

    def __init__(self, loss_fn: LossFn, aux_loss: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 z_loss: float = 0.0, lse: Callable[[torch.Tensor], torch.Tensor] = logsumexp):
        self.loss_fn, self.aux_loss = loss_fn, aux_loss
        self.z_loss, self.lse = z_loss, lse
        self._terms: list[torch.Tensor] = []

    @property
    def carries_aux(self) -> bool:
        """Whether training outputs carry an aux tensor (a pipeline then sends activations whole)."""
        return self.aux_loss is not None

    def __call__(self, outputs, targets: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        if isinstance(outputs, tuple):
            if self.aux_loss is None:
                raise TypeError("the model returned (logits, aux) but its arch declares no aux_loss")
            logits, aux = outputs
            term = self.aux_loss(aux)
        else:
            logits, term = outputs, None
        if self.z_loss and logits.requires_grad:
            z = self.z_loss * self.lse(logits).square().mean()
            term = z if term is None else term + z
        if term is None:
            return self.loss_fn(logits, targets)
        self._terms.append(term.detach())
        return self.loss_fn(logits, targets) + term

    def take_aux_terms(self) -> list[torch.Tensor]:
        """The aux terms of the calls since the last take (on ranks that compute the loss)."""
        terms, self._terms = self._terms, []
        return terms


def is_pipeline_engine(engine) -> bool:  # noqa: ANN001
    from deepspeed.runtime.pipe.engine import PipelineEngine

    return isinstance(engine, PipelineEngine)


def split_batch(batch: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A packed sample holds seq_len + 1 tokens: inputs are the first seq_len, targets the last."""
    batch = batch.to(device, non_blocking=True)
    return batch[:, :-1], batch[:, 1:]


def _all_mean(x: float, device: torch.device) -> float:
    t = torch.tensor([x], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t.item()


@dataclass
class StepResult:
    loss: float  # mean over micro-batches and data-parallel ranks
    grad_norm: float
    lr: float
    skipped: bool = False  # the optimizer refused the update (non-finite gradients): weights unchanged

    @property
    def finite(self) -> bool:
        return math.isfinite(self.loss) and math.isfinite(self.grad_norm) and not self.skipped


def train_step(engine, micro_batches: Iterable[torch.Tensor], device: torch.device,
               loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = lm_loss) -> StepResult:
    """Forward/backward every micro-batch (the engine accumulates and reduces), then one optimizer step.

    A non-finite loss or gradient never reaches the weights: the optimizer skips the update and
    `skipped` says so; what to do next (`fault.nonfinite`) is the caller's policy.
    """
    skipped_before = engine.skipped_steps
    if is_pipeline_engine(engine):  # DeepSpeed's PipelineEngine runs the whole 1F1B schedule itself
        pairs = [split_batch(b, device) for b in micro_batches]
        loss = float(engine.train_batch(data_iter=iter(pairs)))  # averaged over micro-batches and dp, on every stage
        return _result(engine, loss, skipped_before)
    total, n = 0.0, 0
    for batch in micro_batches:
        inputs, targets = split_batch(batch, device)
        loss = loss_fn(engine(inputs), targets)
        engine.backward(loss)
        engine.step()  # a no-op except at the accumulation boundary
        total += loss.item()
        n += 1
    return _result(engine, _all_mean(total / n, device), skipped_before)


def _result(engine, loss: float, skipped_before: int) -> StepResult:  # noqa: ANN001
    norm = engine.get_global_grad_norm()
    norm = float(norm) if norm is not None else float("nan")
    return StepResult(loss=loss, grad_norm=norm, lr=engine.get_lr()[0], skipped=engine.skipped_steps > skipped_before)


@torch.no_grad()
def eval_loss(model: torch.nn.Module, batches: Iterable[torch.Tensor], device: torch.device,
              loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = lm_loss, dp_group=None) -> float:  # noqa: ANN001
    """Token-weighted mean loss over this rank's batches, averaged over the data-parallel ranks.

    `model` is a plain module or a DeepSpeed `PipelineEngine` (which evaluates through its schedule
    and broadcasts the loss to every stage). Ranks of one TP group see the same batches, so the
    reduction runs over `dp_group` (default: the world, for pure data parallelism).
    """
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for batch in batches:
        inputs, targets = split_batch(batch, device)
        if is_pipeline_engine(model):
            loss = float(model.eval_batch(iter([(inputs, targets)]), num_micro_batches=1))  # shape [1] or []
        else:
            loss = loss_fn(model(inputs), targets).double()
        total[0] += loss * targets.numel()
        total[1] += targets.numel()
    if dist.is_initialized():
        dist.all_reduce(total, group=dp_group)
    model.train(was_training)
    return (total[0] / total[1].clamp(min=1)).item()
