"""Training objective: byte cross-entropy plus the per-stage ratio (load-balancing) loss.

Cross-entropy is summed and divided by the number of predicted bytes of the whole global batch
(every micro-batch on every data-parallel rank), so neither gradient accumulation nor the number of
ranks changes the loss. The ratio loss of stage s with target N pushes the boundary fraction
F = mean(b) and the mean boundary probability G = mean(p) towards 1/N:
    N / (N - 1) * ((N - 1) * F * G + (1 - F) * (1 - G))      (minimum 1 at F = G = 1/N).
F and G are means over one micro-batch, as in the reference; the trainer averages the ratio loss over
micro-batches and ranks. Being a product of means it is not additive over rows, so, unlike CE, it
changes slightly when a batch is split differently.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from hnet.modules.dynamic_chunking import RouterOutput
from hnet_titan.data import IGNORE_INDEX



def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of byte cross-entropy (nats, fp32) over positions whose label is not IGNORE_INDEX."""
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")


def ratio_loss(router: RouterOutput, target: float) -> torch.Tensor:
    """The paper's ratio loss for one stage; F carries no gradient, G does."""
    f = router.boundary_mask.float().mean()
    g = router.boundary_prob.float().mean()
    return target / (target - 1) * ((target - 1) * f * g + (1 - f) * (1 - g))


def bits_per_byte(ce_nats: float) -> float:
    return ce_nats / math.log(2)
