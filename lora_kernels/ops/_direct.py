"""When an op may call its backend directly instead of going through its custom op.

The custom-op dispatcher costs tens of µs a call (measured on CPU: ~50 µs for a three-output
op, against ~8 µs for F.layer_norm), as much as the kernel itself at batch 1: forty-eight
adapters in a GPT-2 forward would pay milliseconds for it. A direct call is the same
computation, and it is only taken where the custom op would add nothing: no autograd graph to
record, and nobody tracing or intercepting the call.
"""
import torch

_PLAIN = (torch.Tensor, torch.nn.Parameter)


def allowed(*tensors) -> bool:
    """True for plain eager calls that record no graph: no input needs a gradient (or grad
    mode is off), every input is a plain tensor (not a FakeTensor, DTensor or other subclass),
    and no torch.compile, torch-function mode, dispatch mode or functorch transform is active."""
    if torch.compiler.is_compiling() or torch._C._is_torch_function_mode_enabled():
        return False
    if torch._C._len_torch_dispatch_stack() or torch._C._functorch.peek_interpreter_stack() is not None:
        return False
    grad = torch.is_grad_enabled()
    return all(t is None or (type(t) in _PLAIN and not (grad and t.requires_grad)) for t in tensors)
