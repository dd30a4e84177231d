"""Plain eager calls skip the custom-op dispatcher (ops/_direct.py): without a graph they run the
op's forward, with one a torch.autograd.Function made of the op's own autograd pieces. Both must
give bitwise what the custom op gives, and anything that traces or intercepts must still get
the custom op."""
import threading

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import lora_kernels as lk
from lora_kernels.ops import _direct, adapter as adapter_op, infonce as infonce_op
from lora_kernels.ops import layer_norm as layer_norm_op, lora as lora_op, rms_norm as rms_norm_op

from conftest import DEVICE, backends_for, randn


def _lora():
    return lk.lora_linear, [randn(2, 5, 24), randn(16, 24), randn(16), randn(4, 24), randn(16, 4)], {"scaling": 0.5}


def _adapter():
    return lk.adapter, [randn(7, 24), randn(6, 24), randn(6), randn(24, 6), randn(24)], {"scale": 0.5}


def _layer_norm():
    return lk.layer_norm, [randn(3, 7, 33), randn(33), randn(33)], {}


def _rms_norm():
    return lk.rms_norm, [randn(3, 7, 33), randn(33)], {"offset": 1.0}


def _infonce():
    return lk.infonce, [randn(9, 16), randn(9, 16), torch.tensor(3.0, dtype=torch.float64, device=DEVICE)], {}


def _infonce_rows():  # one rank's block of the distributed loss
    scale = torch.tensor(3.0, dtype=torch.float64, device=DEVICE)
    return infonce_op.infonce_rows, [randn(4, 16), randn(9, 16), scale], {"offset": 3}


# op -> (the case, the module, the name of its forward custom op)
OPS = {"lora_linear": (_lora, lora_op, "lora_linear_fwd"), "adapter": (_adapter, adapter_op, "adapter_fwd"),
       "layer_norm": (_layer_norm, layer_norm_op, "layer_norm_fwd"),
       "rms_norm": (_rms_norm, rms_norm_op, "rms_norm_fwd"), "infonce": (_infonce, infonce_op, "infonce_fwd"),
       "infonce_rows": (_infonce_rows, infonce_op, "infonce_rows_fwd")}
IMPLS_OF = {"infonce_rows": infonce_op.ROWS_IMPLS}
PARAMS = [(name, b) for name, (_, module, _) in OPS.items() for b in backends_for(IMPLS_OF.get(name, module.IMPLS))]


def _forbid_custom_op(monkeypatch, module, name):
    def refuse(*args, **kwargs):
        raise AssertionError(f"{name} went through the custom op")
    monkeypatch.setattr(module, name, refuse)


@pytest.mark.parametrize("op,backend", PARAMS)
def test_no_grad_calls_skip_the_custom_op_and_match_it(monkeypatch, op, backend):
    case, module, name = OPS[op]
    fn, args, kwargs = case()
    with lk.use_backend(backend), torch.no_grad():
        through_op = fn(*args, **kwargs)
        _forbid_custom_op(monkeypatch, module, name)
        direct = fn(*args, **kwargs)
        with torch.inference_mode():
            in_inference = fn(*args, **kwargs)
    assert torch.equal(direct, through_op) and torch.equal(in_inference, through_op)


def _outputs_and_grads(fn, args, kwargs):
    args = [a.detach().clone().requires_grad_(i in (0, 1, 3)) for i, a in enumerate(args)]
    out = fn(*args, **kwargs)
    out.backward(torch.ones_like(out))
    return [out.detach()] + [a.grad for a in args if a.requires_grad]


@pytest.mark.parametrize("op,backend", PARAMS)
def test_calls_that_record_a_graph_skip_the_custom_op_and_match_it(monkeypatch, op, backend):
    case, module, name = OPS[op]
    fn, args, kwargs = case()
    with lk.use_backend(backend):
        with monkeypatch.context() as patch:
            patch.setattr(_direct, "plain", lambda *t: False)   # everything through the custom op
            through_op = _outputs_and_grads(fn, args, kwargs)
        _forbid_custom_op(monkeypatch, module, name)
        direct = _outputs_and_grads(fn, args, kwargs)
    assert len(direct) == len(through_op) >= 3
    for d, o in zip(direct, through_op):
        assert torch.equal(d, o)


@pytest.mark.parametrize("op", OPS)
def test_intercepted_calls_use_the_custom_op(monkeypatch, op):
    case, module, name = OPS[op]
    fn, args, kwargs = case()
    args[0].requires_grad_(True)
    _forbid_custom_op(monkeypatch, module, name)
    with FlopCounterMode(display=False), pytest.raises(AssertionError, match="went through the custom op"):
        fn(*args, **kwargs)


def test_plain_only_without_tracing_or_interception():
    x, w = randn(3, 4), torch.nn.Parameter(randn(4))
    assert _direct.plain(x, w, None)
    with FlopCounterMode(display=False):  # a dispatch mode watches every op
        assert not _direct.plain(x)
    assert not _direct.plain(x.as_subclass(_Subclass))
    assert not torch.func.vmap(lambda t: torch.tensor(_direct.plain(t)))(x).any()
    assert _direct.records_graph(x, w) and not _direct.records_graph(x, None)
    with torch.no_grad():
        assert not _direct.records_graph(x, w)


class _Subclass(torch.Tensor):
    pass


def test_torch_compile_traces_the_custom_op_even_without_grad():
    """Under torch.compile the call must stay one opaque op in the graph, with or without grad."""
    seen = []

    def record(gm, example_inputs):
        seen.extend(str(node.target) for node in gm.graph.nodes)
        return gm.forward

    x, w, b = randn(5, 8), randn(8), randn(8)
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(lambda *t: lk.layer_norm(*t), backend=record, fullgraph=True)(x, w, b)
    assert any("lora_kernels.layer_norm_fwd" in t for t in seen), seen
    assert torch.equal(out, lk.layer_norm(x, w, b))


def _in_thread(fn):
    """Run ``fn`` on a fresh thread (as autograd's device threads run CUDA backwards): it sees
    none of the caller's context variables. Returns the exception it raised, if any."""
    failure = []

    def target():
        try:
            fn()
        except Exception as err:  # noqa: BLE001  handed to the test
            failure.append(err)
    t = threading.Thread(target=target)
    t.start()
    t.join()
    return failure[0] if failure else None


@pytest.mark.parametrize("through_op", [False, True], ids=["direct", "custom-op"])
@pytest.mark.parametrize("op", OPS)
def test_backward_on_another_thread_uses_the_backend_of_its_forward(monkeypatch, op, through_op):
    if through_op:
        monkeypatch.setattr(_direct, "plain", lambda *t: False)
    fn, args, kwargs = OPS[op][0]()
    args[0].requires_grad_(True)
    with lk.use_backend("torch"):
        out = fn(*args, **kwargs)
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "bogus")  # what a backward that forgot would read
    assert _in_thread(lambda: out.sum().backward()) is None
    assert args[0].grad is not None


def test_set_backend_reaches_every_thread():
    lk.set_backend("torch")
    seen = []
    assert _in_thread(lambda: seen.append(lk.get_backend())) is None
    assert seen == ["torch"]
