"""InfoNCELoss: the symmetric CLIP loss as a module, in open_clip ClipLoss argument order."""
import torch
from torch import nn

from ..distributed import all_gather_with_grad, is_distributed
from ..ops.infonce import infonce


class InfoNCELoss(nn.Module):
    """loss = λ·CE(S, labels) + (1−λ)·CE(Sᵀ, labels), S = logit_scale · image · textᵀ.

    With ``gather_distributed=True`` and an initialised process group, the features of all
    ranks are gathered (with gradient), so every rank computes the loss of the global batch,
    as open_clip's ClipLoss does: the value equals the single-process loss on the whole batch,
    and each rank's features receive world_size × their slice of its gradient, which DDP's
    gradient averaging turns into exactly the full-batch gradient.
    """

    def __init__(self, lambda_=0.5, normalize=False, gather_distributed=False):
        super().__init__()
        if not 0.0 <= float(lambda_) <= 1.0:
            raise ValueError(f"lambda_ must be in [0, 1], got {lambda_}")
        self.lambda_, self.normalize, self.gather_distributed = float(lambda_), normalize, gather_distributed

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale) -> torch.Tensor:
        if self.gather_distributed and is_distributed():
            image_features = all_gather_with_grad(image_features)
            text_features = all_gather_with_grad(text_features)
        return infonce(image_features, text_features, logit_scale, lambda_=self.lambda_, normalize=self.normalize)

    def extra_repr(self) -> str:
        return f"lambda_={self.lambda_}, normalize={self.normalize}, gather_distributed={self.gather_distributed}"
