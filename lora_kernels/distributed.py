"""All-gather with gradient, for contrastive losses over the global batch."""
import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _AllGather(torch.autograd.Function):
    """Concatenate every rank's rows; backward sums the gradient from all ranks and
    returns this rank's slice, so each shard gets the gradient of every rank's loss."""

    @staticmethod
    def forward(ctx, x, group):
        world = dist.get_world_size(group)
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous(), group=group)
        ctx.group, ctx.rank, ctx.rows = group, dist.get_rank(group), x.shape[0]
        return torch.cat(parts, 0)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows], None


def all_gather_with_grad(x: torch.Tensor, group=None) -> torch.Tensor:
    """[n, ...] on each rank -> [world·n, ...] in rank order, differentiable.
    Without an initialised process group (or with one rank) returns ``x``."""
    if not is_distributed():
        return x
    sizes = [torch.zeros(1, dtype=torch.int64, device=x.device) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, torch.tensor([x.shape[0]], dtype=torch.int64, device=x.device), group=group)
    if len({int(s) for s in sizes}) != 1:
        raise ValueError(f"every rank must hold the same number of rows to gather; got {[int(s) for s in sizes]}")
    return _AllGather.apply(x, group)


class _AllReduceSum(torch.autograd.Function):
    """Σ over ranks, on every rank. Each rank's copy of the sum feeds that rank's loss, so the
    gradient of a rank's input is the sum of every rank's upstream gradient."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        out = x.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


class _AverageGradient(torch.autograd.Function):
    """Identity forward; backward averages the gradient over ranks (for a replicated input
    whose per-rank gradients are each only a share of the whole)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad / dist.get_world_size(ctx.group), None


def all_reduce_sum_with_grad(x: torch.Tensor, group=None) -> torch.Tensor:
    """Σ_ranks x on every rank, differentiable (``x`` itself without a process group)."""
    return _AllReduceSum.apply(x, group) if is_distributed() else x


def average_gradient_across_ranks(x: torch.Tensor, group=None) -> torch.Tensor:
    """``x`` unchanged; its gradient becomes the mean of every rank's (no-op without a group)."""
    return _AverageGradient.apply(x, group) if is_distributed() and x.requires_grad else x
