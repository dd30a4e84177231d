"""Several named adapters on one LoRALinear, and batches that mix them per sample.

Storage: the first adapter ("default" for a layer made directly) keeps the Parameters
``lora_A``/``lora_B`` (and DoRA's ``lora_magnitude_vector``) on the layer itself, so a
one-adapter layer has today's state_dict keys; every other adapter is a ``LoRAAdapterWeights``
in the ModuleDict ``lora_adapters`` (keys ``lora_adapters.<name>.lora_A``...), created with the
second adapter. Keys do not depend on which adapter is active. Attribute access to
``lora_A``/``lora_B``/``lora_magnitude_vector`` (read and write) and to the per-adapter settings
``r``/``alpha``/``dropout``/``use_rslora`` is routed to the active adapter, so merge, DoRA, the
fused single-adapter call and the surgery code all act on the active adapter unchanged.

Mixed batches (``lk.adapter_batch`` sets ``_batch_names``, one name or None per sample) run
``lora_linear_multi`` on stacked, zero-padded adapters:
  * without autograd (serving), every adapter of the layer is stacked once and the stack kept
    until one of its tensors changes (data pointer, version counter, shape), so a serving loop
    restacks nothing whatever the mix of requests;
  * with autograd (training), only the adapters present in the batch are stacked, on every call:
    the stack must be part of this step's graph for each adapter's own Parameters to get their
    gradient. It copies n·r·(K + N) elements beside the base GEMM's N·K weight reads (r/N of
    them per adapter: 16/4096 for r = 16 at N = K = 4096) in two kernels when the ranks are
    equal (plus one pad per smaller-rank adapter), small beside a training step's GEMMs; the
    alternative, Parameters that are views of one stacked tensor, would change every adapter's
    keys and Parameter identity. Not measured on a GPU yet.
"""
import contextlib
import math

import torch
from torch import nn

from ..ops import _validate as check
from ..ops.lora import lora_linear
from ..ops.lora_multi import lora_linear_multi
from ..reference import compute_dtype
from . import dora

ROUTED = ("lora_A", "lora_B", "lora_magnitude_vector")
SETTINGS = ("r", "alpha", "dropout", "use_rslora")
CONTAINER = "lora_adapters"


class LoRAAdapterWeights(nn.Module):
    """The trainable tensors of one adapter other than a LoRALinear's first."""

    def __init__(self, lora_A: nn.Parameter, lora_B: nn.Parameter, magnitude=None):
        super().__init__()
        self.lora_A, self.lora_B = lora_A, lora_B
        if magnitude is not None:
            self.lora_magnitude_vector = magnitude


# ------------------------------------------------------------------ storage and routing

def init_adapters(module, **settings) -> None:
    d = module.__dict__
    d["_adapter_cfg"] = {"default": dict(settings)}
    d["_first"] = d["_active"] = "default"
    d["_batch_names"], d["_stack_cache"], d["_routing_cache"] = None, None, None


def per_adapter(key: str) -> property:
    def get(self):
        return self._adapter_cfg[self._first if self._active is None else self._active][key]

    def set_(self, value):
        self._adapter_cfg[self._first if self._active is None else self._active][key] = value
    return property(get, set_, doc=f"The active adapter's {key}.")


def _routed_holder(module, name: str):
    """The LoRAAdapterWeights holding the active adapter's ``name`` tensor, or None for the layer itself."""
    d = module.__dict__
    active = d.get("_active")
    if name in ROUTED and active is not None and active != d.get("_first"):
        return d["_modules"][CONTAINER][active]
    return None


def getattr_(self, name: str):
    holder = _routed_holder(self, name)
    return nn.Module.__getattr__(self, name) if holder is None else getattr(holder, name)


def setattr_(self, name: str, value) -> None:
    holder = _routed_holder(self, name)
    if holder is None:
        nn.Module.__setattr__(self, name, value)
    else:
        setattr(holder, name, value)


def setstate(self, state) -> None:
    nn.Module.__setstate__(self, state)
    d = self.__dict__
    if "_adapter_cfg" not in d:  # pickled before layers held named adapters
        d["_adapter_cfg"] = {"default": {k: d.pop(k) for k in SETTINGS}}
        d["_first"] = d["_active"] = "default"
    d.setdefault("_batch_names", None)
    d["_stack_cache"] = d["_routing_cache"] = None


def param(module, adapter: str, kind: str) -> torch.Tensor:
    """Adapter ``adapter``'s ``kind`` tensor, whichever adapter is active (read from the
    modules' parameter dicts: a serving step reads 2n of them per layer)."""
    holder = module if adapter == module._first else module._modules[CONTAINER]._modules[adapter]
    return holder._parameters[kind]


def scaling_of(settings: dict) -> float:
    return settings["alpha"] / (math.sqrt(settings["r"]) if settings["use_rslora"] else settings["r"])


def adapter_names(self) -> list:
    return list(self._adapter_cfg)


# ------------------------------------------------------------------ add / set / delete

def check_name(name) -> None:
    if not isinstance(name, str):
        raise TypeError(f"adapter name must be a str, got {type(name).__name__}")
    if not name or "." in name or name == "__base__" or hasattr(nn.ModuleDict, name):
        raise ValueError(f"adapter name {name!r} is not allowed (non-empty, no '.', not '__base__' "
                         f"nor a ModuleDict attribute)")


def _check_new_name(module, name) -> None:
    check_name(name)
    if name in module._adapter_cfg:
        raise ValueError(f"adapter {name!r} already exists (adapters: {module.adapter_names})")


def adopt(module, name: str, lora_A: nn.Parameter, lora_B: nn.Parameter, magnitude=None, **settings) -> None:
    """Register ``lora_A`` [r, in] / ``lora_B`` [out, r] (the very objects) as adapter ``name``."""
    _check_new_name(module, name)
    if CONTAINER not in module._modules:
        nn.Module.__setattr__(module, CONTAINER, nn.ModuleDict())
    module._modules[CONTAINER][name] = LoRAAdapterWeights(lora_A, lora_B, magnitude)
    module._adapter_cfg[name] = dict(settings)
    module.__dict__["_stack_cache"] = None


def add_adapter(self, name: str, r: int, alpha: float, dropout: float = 0.0, *, use_rslora=None) -> None:
    """A new adapter (lora_A Kaiming-uniform, lora_B zero: the layer's output is unchanged
    under it), not made active (``set_adapter``). ``use_rslora`` defaults to the active one's.
    On a DoRA layer it gets its own magnitude, ‖W0‖ by rows."""
    _check_new_name(self, name)
    r, alpha = check.positive_int("r", r), check.finite_number("alpha", alpha)
    if not 0.0 <= check.finite_float("dropout", dropout) < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if self.use_dora and self.merged:
        raise ValueError("add_adapter on a merged DoRA layer: unmerge() it first (the magnitude starts at ‖W0‖)")
    w = self.weight
    A = nn.Parameter(torch.empty(r, self.in_features, device=w.device, dtype=w.dtype))
    B = nn.Parameter(torch.zeros(self.out_features, r, device=w.device, dtype=w.dtype))
    nn.init.kaiming_uniform_(A, a=math.sqrt(5))
    mag = nn.Parameter(torch.empty(self.out_features, device=w.device, dtype=w.dtype)) if self.use_dora else None
    adopt(self, name, A, B, mag, r=r, alpha=alpha, dropout=float(dropout),
          use_rslora=bool(self.use_rslora if use_rslora is None else use_rslora))
    if mag is not None:
        previous, self.__dict__["_active"] = self._active, name
        try:
            dora.reset_magnitude(self)
        finally:
            self.__dict__["_active"] = previous


def set_adapter(self, name) -> None:
    """Make ``name`` the adapter of the single-adapter path (None: the base layer only).
    A merged layer is unmerged first. requires_grad flags are left as they are."""
    if name is not None and name not in self._adapter_cfg:
        raise ValueError(f"unknown adapter {name!r}; this layer has {self.adapter_names}")
    if name != self._active:
        self.unmerge()
        self.__dict__["_active"] = name


def delete_adapter(self, name: str) -> None:
    """Remove adapter ``name`` (its Parameters leave the module). Deleting the active one makes
    the first remaining one active; deleting the first moves the next one's tensors to the
    layer's own ``lora_A``/``lora_B`` keys. The last adapter cannot be deleted."""
    cfg = self._adapter_cfg
    if name not in cfg:
        raise ValueError(f"unknown adapter {name!r}; this layer has {self.adapter_names}")
    if len(cfg) == 1:
        raise ValueError(f"cannot delete {name!r}: it is this layer's only adapter")
    if name == self._active:
        self.unmerge()
    container = self._modules[CONTAINER]
    if name == self._first:
        successor = next(n for n in cfg if n != name)
        holder = container[successor]
        del container[successor]
        for kind in ROUTED:
            if kind in holder._parameters:
                self._parameters[kind] = holder._parameters[kind]
        self.__dict__["_first"] = successor
    else:
        del container[name]
    del cfg[name]
    if name == self._active:
        self.__dict__["_active"] = next(iter(cfg))
    if not len(container):
        del self._modules[CONTAINER]
    self.__dict__["_stack_cache"] = None


def rename(module, old: str, new: str) -> None:
    """Adapter ``old`` is called ``new`` from now on (its tensors move to the new keys)."""
    if new == old:
        return
    _check_new_name(module, new)
    cfg = module._adapter_cfg
    module.__dict__["_adapter_cfg"] = {new if n == old else n: v for n, v in cfg.items()}
    if old != module._first:
        container = module._modules[CONTAINER]
        holder = container[old]
        del container[old]
        container[new] = holder
    d = module.__dict__
    d["_first"] = new if d["_first"] == old else d["_first"]
    d["_active"] = new if d["_active"] == old else d["_active"]


@contextlib.contextmanager
def activated(modules, name: str):
    """Inside, each LoRALinear of ``modules`` that holds adapter ``name`` has it active, without
    unmerging (to read or write its tensors and settings); yields the ids of those layers."""
    saved = [(m, m._active) for m in modules if name in m._adapter_cfg]
    try:
        for m, _ in saved:
            m.__dict__["_active"] = name
        yield {id(m) for m, _ in saved}
    finally:
        for m, active in saved:
            m.__dict__["_active"] = active


def adapter_parameters(module, name: str) -> list:
    """Adapter ``name``'s trainable tensors (lora_A, lora_B, and DoRA's magnitude)."""
    params = module._parameters if name == module._first else module._modules[CONTAINER][name]._parameters
    return [params[kind] for kind in ROUTED if params.get(kind) is not None]


def all_parameters(module) -> list:
    """Every adapter's trainable tensors."""
    return [p for name in module._adapter_cfg for p in adapter_parameters(module, name)]


# ------------------------------------------------------------------ mixed batches

def _stacked(module, names: list):
    """(lora_A [n, r_max, K], lora_B [n, N, r_max]) of ``names``, zero-padded to the largest rank."""
    As = [param(module, n, "lora_A") for n in names]
    Bs = [param(module, n, "lora_B") for n in names]
    key = None
    if not torch.is_grad_enabled() and not torch.compiler.is_compiling():
        # A new data pointer or version counter means the tensor was replaced or written in place.
        key = (tuple(names), torch.is_inference_mode_enabled(),
               tuple((t.data_ptr(), t._version, t.shape) for t in As + Bs))
        cached = module.__dict__.get("_stack_cache")
        if cached is not None and cached[0] == key:
            return cached[1]
    r = max(a.shape[0] for a in As)
    pad = nn.functional.pad
    # Only smaller ranks are padded: with equal ranks each stack is one copy kernel.
    stack = (torch.stack([a if a.shape[0] == r else pad(a, (0, 0, 0, r - a.shape[0])) for a in As]),
             torch.stack([b if b.shape[1] == r else pad(b, (0, r - b.shape[1])) for b in Bs]))
    if key is not None:
        module.__dict__["_stack_cache"] = (key, stack)
    return stack


def _routing(module, names: tuple, present: list, x: torch.Tensor):
    """(adapter ids [M] on the host, scalings [n] on x's device), kept while names, adapters and
    scalings stay the same (decode steps of one batch): host ids keep the op's range check free
    of device syncs, and the scalings are copied to the device once."""
    cfg = module._adapter_cfg
    scalings = tuple(scaling_of(cfg[n]) for n in present)
    key = (names, tuple(present), scalings, x.device, x.dtype)
    cached = module.__dict__.get("_routing_cache")
    if cached is not None and cached[0] == key:
        return cached[1]
    index = {n: i for i, n in enumerate(present)}
    routing = (torch.tensor([index.get(n, -1) for n in names]),
               torch.tensor(scalings, dtype=torch.float64).to(x.device, compute_dtype(x.dtype)))
    if not torch.compiler.is_compiling():
        module.__dict__["_routing_cache"] = (key, routing)
    return routing


def mixed_forward(module, x: torch.Tensor, names: tuple) -> torch.Tensor:
    """Sample b of x (its first dim) through adapter names[b]; None, or a name this layer does
    not hold, gives the base layer there (as PEFT's layers do)."""
    if x.ndim < 2 or x.shape[0] != len(names):
        raise ValueError(f"adapter_batch: {len(names)} adapter names, but a LoRALinear got an input of shape "
                         f"{list(x.shape)} (one name per sample of the first dim)")
    if module.merged:
        raise ValueError("adapter_batch: this LoRALinear is merged; unmerge() it before mixing adapters in a batch")
    cfg = module._adapter_cfg
    present = [n for n in dict.fromkeys(names) if n is not None and n in cfg]
    if module.disable_adapters or not present:
        return nn.functional.linear(x, module.base_weight(), module.bias)
    if module.use_dora:
        raise NotImplementedError("adapter_batch over DoRA adapters is not supported yet "
                                  "(set_adapter runs one DoRA adapter at a time)")
    if len(present) == 1 and all(n == present[0] for n in names):  # one adapter: the single-adapter op
        n = present[0]
        return lora_linear(x, module.base_weight(), module.bias, param(module, n, "lora_A"),
                           param(module, n, "lora_B"), scaling_of(cfg[n]), dropout_p=cfg[n]["dropout"],
                           training=module.training)
    dropouts = {cfg[n]["dropout"] for n in present}
    if module.training and len(dropouts) > 1:
        raise ValueError(f"adapter_batch in training: the adapters {present} have different dropout "
                         f"{sorted(dropouts)}; one batch draws one dropout mask (use one dropout, or eval())")
    if not torch.is_grad_enabled():
        present = list(cfg)  # serving: the whole layer's stack, cached
    ids, scalings = _routing(module, names, present, x)
    A, B = _stacked(module, present)
    return lora_linear_multi(x, module.base_weight(), module.bias, A, B, scalings, ids, dropout_p=dropouts.pop(),
                             training=module.training)
