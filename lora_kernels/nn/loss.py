"""InfoNCELoss: the symmetric CLIP loss as a module, in open_clip ClipLoss argument order."""
import torch
import torch.distributed as dist
from torch import nn

from ..distributed import all_gather_with_grad, all_reduce_sum_with_grad, average_gradient_across_ranks, is_distributed
from ..ops.infonce import infonce, infonce_rows


class InfoNCELoss(nn.Module):
    """loss = λ·CE(S, labels) + (1−λ)·CE(Sᵀ, labels), S = logit_scale · image · textᵀ.

    With ``gather_distributed=True`` and an initialised process group, the features of all
    ranks are gathered (with gradient) and each rank runs the kernel on its own rows against the
    gathered columns, in both directions (a rectangular block of S with a diagonal offset; no
    rank ever holds the whole N×N problem); the blocks' sums are all-reduced. The result follows
    open_clip's ClipLoss (gather_with_grad): the value on every rank equals the single-process
    loss on the whole batch; each rank's features receive world_size × their slice of its
    gradient, and logit_scale the whole-batch dL/dc, which DDP's gradient averaging turns into
    exactly the full-batch gradient.
    """

    def __init__(self, lambda_=0.5, normalize=False, gather_distributed=False):
        super().__init__()
        if not 0.0 <= float(lambda_) <= 1.0:
            raise ValueError(f"lambda_ must be in [0, 1], got {lambda_}")
        self.lambda_, self.normalize, self.gather_distributed = float(lambda_), normalize, gather_distributed

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale) -> torch.Tensor:
        if self.gather_distributed and is_distributed():
            return self._gathered(image_features, text_features, logit_scale)
        return infonce(image_features, text_features, logit_scale, lambda_=self.lambda_, normalize=self.normalize)

    def _gathered(self, image, text, logit_scale):
        all_image, all_text = all_gather_with_grad(image), all_gather_with_grad(text)
        offset = dist.get_rank() * image.shape[0]  # this rank's rows in the gathered batch
        if isinstance(logit_scale, torch.Tensor):
            logit_scale = average_gradient_across_ranks(logit_scale)
        part = 0.0
        if self.lambda_ > 0.0:
            part = self.lambda_ * infonce_rows(image, all_text, logit_scale, offset, self.normalize)
        if self.lambda_ < 1.0:
            part = part + (1.0 - self.lambda_) * infonce_rows(text, all_image, logit_scale, offset, self.normalize)
        return all_reduce_sum_with_grad(part)

    def extra_repr(self) -> str:
        return f"lambda_={self.lambda_}, normalize={self.normalize}, gather_distributed={self.gather_distributed}"
