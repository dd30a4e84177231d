"""Eager calls without the custom-op dispatcher.

The dispatcher costs tens of µs a call (measured on CPU: ~20 µs for a bare custom op with no
grad, ~48 µs with autograd, against ~8 µs for F.layer_norm), as much as the kernel itself at
batch 1: forty-eight adapters in a GPT-2 forward would pay milliseconds for it. So plain eager
calls run the op's own pieces directly: its forward when no graph is recorded, else a
torch.autograd.Function built from its forward, setup_context and backward (the same three the
custom op registers). Anything that traces or intercepts the call gets the custom op.
"""
import torch

from .. import backend
from . import _autocast

_PLAIN = (torch.Tensor, torch.nn.Parameter)


def plain(*tensors) -> bool:
    """True when nothing traces or intercepts the call: no torch.compile, torch-function mode,
    dispatch mode or functorch transform is active, and every tensor is a plain one (not a
    FakeTensor, DTensor or other subclass)."""
    if torch.compiler.is_compiling() or torch._C._is_torch_function_mode_enabled():
        return False
    if torch._C._len_torch_dispatch_stack() or torch._C._functorch.peek_interpreter_stack() is not None:
        return False
    return all(t is None or type(t) in _PLAIN for t in tensors)


def records_graph(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def autograd_function(name, forward, setup_context, backward):
    """A torch.autograd.Function running ``forward`` with the custom op's own autograd pieces."""
    def fwd(ctx, *inputs):
        outputs = forward(*inputs)
        setup_context(ctx, inputs, outputs)
        return outputs
    return type(name, (torch.autograd.Function,), {"forward": staticmethod(fwd), "backward": staticmethod(backward)})


def backward(ctx, custom_op, impl, args, n_tensors):
    """An op's backward step: ``custom_op(*args)``, or ``impl(*args)`` directly when nothing
    traces it, under the backend its forward saw (``ctx.backend``: autograd may run it on a
    thread that never saw the caller's ``use_backend``)."""
    fn = impl if plain(*args[:n_tensors]) else custom_op
    with backend.pinned(ctx.backend), _autocast.off(args[0]):
        return fn(*args)


def run(custom_op, forward, function, args, n_tensors):
    """``custom_op(*args)``, or the same computation without the dispatcher where that is safe;
    the first ``n_tensors`` args are the tensor inputs, already cast for autocast by the op
    (``_autocast``), which is off inside."""
    tensors = args[:n_tensors]
    with _autocast.off(tensors[0]):
        if not plain(*tensors):
            return custom_op(*args)
        return function.apply(*args) if records_graph(*tensors) else forward(*args)
