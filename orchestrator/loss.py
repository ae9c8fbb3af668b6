"""The causal-LM loss without the full-vocabulary logits of the batch.

transformers computes logits for every position (b x s x V) and upcasts them to fp32 for the
cross-entropy: at V = 128k, s = 2048 that is 1 GiB per sequence, plus its gradient, the largest
tensor of a LoRA step. Here the output head and the cross-entropy run together over chunks of
target positions only: per chunk, fp32 logits, their log-sum-exp, the loss, and at once the
gradient with respect to the hidden states (softmax minus one-hot, times the head's weight). The
logits are never kept, so no chunk is recomputed in backward and the FLOPs are those of the
unchunked loss. The head is frozen (LoRA does not train it), so no weight gradient is needed.
On CUDA with liger-kernel installed, Liger's fused linear cross-entropy does the same in Triton.

How it hooks into any Hugging Face causal LM without reimplementing its forward: the output head
module keeps its parameters, hooks and tied weights, but its class becomes LossHead, which,
while targets are set, returns the summed loss instead of logits; the model is called without
labels, so its own loss is not computed, and the loss comes back as `logits`. Models that
transform logits after the head (Gemma's soft-capping, Cohere's logit scale) keep the full path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from orchestrator.data import IGNORE_INDEX

LossFn = Callable[[nn.Module, dict[str, torch.Tensor], int], torch.Tensor]
# Config attributes of architectures whose forward changes the logits after the output head.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale", "logits_scaling")


class _HeadCrossEntropy(torch.autograd.Function):
    """sum over rows of CE(hidden @ weight.T + bias, targets), times `scale`; the gradient with
    respect to `hidden` is computed in forward, chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk, scale):  # noqa: ANN001, ANN205 - autograd's signature
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        for s in range(0, hidden.shape[0], chunk):
            logits = nn.functional.linear(hidden[s : s + chunk], weight, bias).float()
            target = targets[s : s + chunk]
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, target[:, None]).squeeze(1)).sum()
            if grad is not None:
                probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                probs[torch.arange(len(target), device=target.device), target] -= 1.0
                grad[s : s + chunk] = probs.mul_(scale).to(weight.dtype) @ weight
        ctx.save_for_backward(grad)
        return total * scale

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001, ANN205
        (grad,) = ctx.saved_tensors
        return (None if grad is None else grad * grad_out.to(grad.dtype)), None, None, None, None, None


class LossHead(nn.Linear):
    """The model's output head; with targets set (LossHead.targets), its forward returns the
    summed cross-entropy of the target positions over `scale` instead of logits."""

    chunk: int
    _targets: tuple[torch.Tensor, float] | None = None

    @contextlib.contextmanager
    def targets(self, labels: torch.Tensor, num_items: int) -> Iterator[None]:
        self._targets = (labels, 1.0 / max(num_items, 1))
        try:
            yield
        finally:
            self._targets = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self._targets is None:
            return super().forward(hidden)
        labels, scale = self._targets
        # Position t predicts the token at t + 1 (transformers' loss shifts the same way).
        shifted = labels[:, 1:]
        keep = shifted != IGNORE_INDEX
        rows, targets = hidden[:, :-1][keep], shifted[keep]
        return head_cross_entropy(rows, self.weight, self.bias, targets, self.chunk, scale)


def head_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    chunk: int,
    scale: float,
) -> torch.Tensor:
    if hidden.is_cuda and bias is None:
        try:
            from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
        except ImportError:
            pass
        else:
            return liger_fused_linear_cross_entropy(hidden, weight, targets, reduction="sum") * scale
    return _HeadCrossEntropy.apply(hidden, weight, bias, targets, chunk, scale)


def full_loss(model: nn.Module, batch: dict[str, torch.Tensor], num_items: int) -> torch.Tensor:
    """transformers' own loss: full logits, normalised by the step's target tokens."""
    return model(**batch, num_items_in_batch=max(num_items, 1), use_cache=False).loss


def _inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's inputs: input_ids with attention_mask (padded rows) or position_ids (packed rows).
    The losses pass use_cache=False too: with a KV cache, transformers ignores packing."""
    return {k: v for k, v in batch.items() if k != "labels"}


def build_loss(model: nn.Module, chunk_tokens: int) -> LossFn:
    """The loss function of the training loop for `model` (before it is sharded): chunked when
    chunk_tokens > 0 and the architecture allows it, else transformers' own."""
    head = model.get_output_embeddings()
    config = model.config
    if (
        chunk_tokens <= 0
        or type(head) is not nn.Linear
        or head.weight.requires_grad
        or any(getattr(config, a, None) not in (None, 1, 1.0) for a in LOGIT_TRANSFORMS)
    ):
        return full_loss
    head.__class__ = LossHead  # same parameters, hooks and ties; only forward changes
    head.chunk = chunk_tokens

    def chunked_loss(model: nn.Module, batch: dict[str, torch.Tensor], num_items: int) -> torch.Tensor:
        with head.targets(batch["labels"], num_items):
            return model(**_inputs(batch), use_cache=False).logits

    return chunked_loss
