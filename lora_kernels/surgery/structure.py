"""Where each transformer block's sub-layers end, found from the modules' structure.

A module is an attention core when it has a query (or fused q/k/v) projection among its
children; its output is its own output-projection child, or else (BERT, HF ViT) its parent's
``output.dense``. A module is a feed-forward when it holds an up/down pair of linear children
(``fc1``/``fc2``, ``c_fc``/``c_proj``, ``up_proj``/``down_proj``, T5's ``wi``/``wo``...), or,
BERT-style, sibling ``intermediate`` and ``output`` modules each with a ``dense``. This finds the
same places in HF BERT/RoBERTa/ViT/CLIP, GPT-2, LLaMA/Mistral/Qwen, T5, timm ViT/DeiT/Swin,
open_clip and torch's own ``nn.TransformerEncoderLayer`` without a list of full names.

``nn.MultiheadAttention`` computes its projections from ``in_proj_weight`` and
``out_proj.weight`` inside its forward and never calls ``out_proj``; so the attention output
of such a block is the MHA module itself, and anything wrapped around ``out_proj`` would never
run. ``check_on_forward_path`` refuses such targets; LoRA on the MHA itself is
``mha.LoRAMultiheadAttention``.
"""
from torch import nn

from ..nn import LoRALinear
from ._common import _is_linear
from .mha import LoRAMultiheadAttention

# Children that make a module an attention core (query or fused q/k/v projections).
QUERY_NAMES = ("query", "q_proj", "query_proj", "q", "q_lin", "qkv", "qkv_proj", "c_attn", "query_key_value", "Wqkv")
# An attention core's own output projection, first match wins.
ATTENTION_OUT_NAMES = ("o_proj", "out_proj", "proj", "c_proj", "o", "out_lin", "dense")
# (up, down) children of a feed-forward module; the down projection is the sub-layer's output.
FFN_PAIRS = (("fc1", "fc2"), ("c_fc", "c_proj"), ("up_proj", "down_proj"), ("gate_up_proj", "down_proj"),
             ("fc1_x", "fc2"), ("wi", "wo"), ("wi_0", "wo"), ("dense_h_to_4h", "dense_4h_to_h"), ("lin1", "lin2"),
             ("linear1", "linear2"), ("w1", "w2"))

DESCRIPTION = ("attention: nn.MultiheadAttention, or a module with a query projection child "
               f"{QUERY_NAMES} and an output projection child {ATTENTION_OUT_NAMES} (else its parent's "
               "output.dense, as BERT's attention.output.dense); feed-forward: a module with children "
               f"{FFN_PAIRS}, or sibling intermediate.dense / output.dense")


def _wrapped(module: nn.Module) -> nn.Module:
    """The module inside an AdapterAfter (so a second add_adapters finds the same places)."""
    from .adapters import AdapterAfter  # adapters imports this module
    return module.module if isinstance(module, AdapterAfter) else module


def _is_projection(module) -> bool:
    inner = _wrapped(module) if isinstance(module, nn.Module) else None
    return inner is not None and (_is_linear(inner) or isinstance(inner, LoRALinear))


def _is_mha(module: nn.Module) -> bool:
    return isinstance(_wrapped(module), (nn.MultiheadAttention, LoRAMultiheadAttention))


def _child_projection(module: nn.Module, names) -> str | None:
    children = dict(module.named_children())
    return next((n for n in names if _is_projection(children.get(n))), None)


def _has_dense(module) -> bool:
    return isinstance(module, nn.Module) and _child_projection(module, ("dense",)) is not None


def _is_attention_core(module: nn.Module) -> bool:
    return _child_projection(module, QUERY_NAMES) is not None


def sublayer_outputs(model: nn.Module) -> dict:
    """{"attention": [qualified names], "ffn": [qualified names]} in model order.

    Attention entries are output projections, or ``nn.MultiheadAttention`` modules themselves.
    """
    found = {"attention": [], "ffn": []}

    def visit(module: nn.Module, prefix: str) -> None:
        if _is_mha(module):
            found["attention"].append(prefix)
            return  # its out_proj is read, never called
        join = (lambda n: f"{prefix}.{n}") if prefix else (lambda n: n)
        children = dict(module.named_children())
        if _is_attention_core(module):
            out = _child_projection(module, ATTENTION_OUT_NAMES)
            if out is not None:
                found["attention"].append(join(out))
        # BERT / HF ViT: the core (.self / .attention) and its output (.output.dense) are siblings.
        if _has_dense(children.get("output")):
            if any(_is_attention_core(c) and _child_projection(c, ATTENTION_OUT_NAMES) is None
                   for c in children.values()):
                found["attention"].append(join("output.dense"))
            elif _has_dense(children.get("intermediate")):
                found["ffn"].append(join("output.dense"))
        for up, down in FFN_PAIRS:
            if up in children and _is_projection(children.get(down)):
                found["ffn"].append(join(down))
                break
        for name, child in children.items():
            if not _is_projection(child):
                visit(child, join(name))

    visit(model, "")
    return found


def off_path_reason(model: nn.Module, name: str) -> str | None:
    """Why a module put at ``name`` would never run (its parent reads its parameters instead of
    calling it), or None. Selection rules such as "all linear layers" can skip such names."""
    parent_name = name.rpartition(".")[0]
    parent = model.get_submodule(parent_name)
    module = model.get_submodule(name)
    if isinstance(parent, nn.MultiheadAttention) or type(module).__name__ == "NonDynamicallyQuantizableLinear":
        return (f"'{name}' is the output projection of an nn.MultiheadAttention, which reads its weight and "
                f"bias directly and never calls it, so a module put there would never run; target the "
                f"MultiheadAttention '{parent_name}' itself instead (apply_lora puts LoRA on its in- and "
                f"out-projections; add_adapters wraps its output)")
    return None


def check_on_forward_path(model: nn.Module, name: str, what: str) -> None:
    """Refuse (ValueError) a target that would never run; see ``off_path_reason``."""
    reason = off_path_reason(model, name)
    if reason is not None:
        raise ValueError(f"{what}: {reason}")


def keep_fast_paths_off(model: nn.Module, names) -> None:
    """torch's nn.TransformerEncoderLayer has an inference fast path (eval, no grad) that reads
    its sub-modules' weights into one fused call and calls none of them, so an adapter or LoRA
    inside would silently drop out at inference. The layer skips that path when its
    ``activation_relu_or_gelu`` flag is 0 (the slow path, used in training, reads ``activation``
    itself), so the flag is cleared on each such layer that holds an inserted module."""
    for name in names:
        parts = name.split(".")
        for i in range(len(parts)):
            owner = model.get_submodule(".".join(parts[:i]))
            if isinstance(owner, nn.TransformerEncoderLayer):
                owner.activation_relu_or_gelu = 0
