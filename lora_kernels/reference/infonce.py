"""Symmetric temperature-scaled InfoNCE (the CLIP loss).

S = c·I Tᵀ, L = (1/N) Σᵢ [λ(LSE_j S_ij − S_ii) + (1−λ)(LSE_j S_ji − S_ii)].
"""
import torch

from . import compute_dtype, empty_grad


# Rows are divided by max(‖z‖, NORM_EPS), as F.normalize (open_clip) does: a zero row stays zero
# (its logits 0) instead of making the whole loss NaN.
NORM_EPS = 1e-12


def _normalize(z):
    return z / z.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)


def infonce(image, text, logit_scale, lambda_=0.5, normalize=False):
    """The spec in open_clip's form (two cross-entropies), differentiable by autograd."""
    if normalize:
        image, text = _normalize(image), _normalize(text)
    logits = logit_scale * image @ text.T
    labels = torch.arange(image.shape[0], device=image.device)
    ce = torch.nn.functional.cross_entropy
    return lambda_ * ce(logits, labels) + (1.0 - lambda_) * ce(logits.T, labels)


def _prepare(image, text, logit_scale, normalize):
    ct = compute_dtype(image.dtype)
    i, t = image.to(ct), text.to(ct)
    if normalize:
        i, t = _normalize(i), _normalize(t)
    return i, t, logit_scale.to(ct).reshape(())


def _through_norm(z_raw, z_unit, dz_unit, normalize):
    """Chain rule through z_unit = z_raw/max(‖z_raw‖, eps) (identity without normalisation).
    A zero row gets dz_unit/eps, as through F.normalize (the radial term vanishes with z_unit)."""
    if not normalize:
        return dz_unit
    norm = z_raw.to(dz_unit.dtype).norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)
    return (dz_unit - z_unit * (z_unit * dz_unit).sum(-1, keepdim=True)) / norm


def forward(image, text, logit_scale, lambda_, normalize):
    """-> (loss: 0-d, lse_row:[N], lse_col:[N]), all in the compute dtype."""
    i, t, c = _prepare(image, text, logit_scale, normalize)
    s = c * (i @ t.T)
    lse_row, lse_col = s.logsumexp(1), s.logsumexp(0)
    diag = s.diagonal()
    n = max(image.shape[0], 1)
    loss = (lambda_ * (lse_row - diag) + (1.0 - lambda_) * (lse_col - diag)).sum() / n
    return loss, lse_row, lse_col


def backward(gloss, image, text, logit_scale, lse_row, lse_col, lambda_, normalize,
             need_dimage: bool, need_dtext: bool, need_dscale: bool):
    """Gradients (d image, d text, d logit_scale), via G = ∂L/∂S, without autograd."""
    i, t, c = _prepare(image, text, logit_scale, normalize)
    n = image.shape[0]
    s_unscaled = i @ t.T
    s = c * s_unscaled
    eye = torch.eye(n, dtype=s.dtype, device=s.device)
    p_row = torch.exp(s - lse_row[:, None])
    p_col = torch.exp(s - lse_col[None, :])
    G = gloss.to(s.dtype) / max(n, 1) * (lambda_ * (p_row - eye) + (1.0 - lambda_) * (p_col - eye))
    return _grads_from(G, s_unscaled, image, i, text, t, logit_scale, c, normalize,
                       need_dimage, need_dtext, need_dscale)


def _grads_from(G, s_unscaled, image, i, text, t, logit_scale, c, normalize,
                need_dimage, need_dtext, need_dscale):
    """(d image, d text, d logit_scale) from G = ∂L/∂S, with S = c·i tᵀ on the (unit) rows
    i, t of the raw features image, text."""
    di = _through_norm(image, i, c * (G @ t), normalize).to(image.dtype) if need_dimage else empty_grad(image)
    dt = _through_norm(text, t, c * (G.T @ i), normalize).to(text.dtype) if need_dtext else empty_grad(text)
    dc = empty_grad(logit_scale)
    if need_dscale:
        dc = (G * s_unscaled).sum().to(logit_scale.dtype).reshape(logit_scale.shape)
    return di, dt, dc


# One direction on a rectangular block, for the distributed loss: local query rows against
# the gathered keys of every rank; query row i is paired with key row i + offset.

def rows_forward(queries, keys, logit_scale, offset, normalize):
    """-> (part = Σᵢ (LSE_j S_ij − S_i,i+offset) / n_keys : 0-d, lse:[m]) in the compute dtype."""
    q, k, c = _prepare(queries, keys, logit_scale, normalize)
    s = c * (q @ k.T)
    lse = s.logsumexp(1)
    m = q.shape[0]
    diag = s[torch.arange(m, device=s.device), offset + torch.arange(m, device=s.device)]
    return (lse - diag).sum() / max(keys.shape[0], 1), lse


def rows_backward(gpart, queries, keys, logit_scale, lse, offset, normalize,
                  need_dqueries: bool, need_dkeys: bool, need_dscale: bool):
    """Gradients (d queries, d keys, d logit_scale) of ``rows_forward``'s part."""
    q, k, c = _prepare(queries, keys, logit_scale, normalize)
    m, n = q.shape[0], k.shape[0]
    s_unscaled = q @ k.T
    s = c * s_unscaled
    target = torch.zeros_like(s)
    target[torch.arange(m, device=s.device), offset + torch.arange(m, device=s.device)] = 1.0
    G = gpart.to(s.dtype) / max(n, 1) * (torch.exp(s - lse[:, None]) - target)
    return _grads_from(G, s_unscaled, queries, q, keys, k, logit_scale, c, normalize,
                       need_dqueries, need_dkeys, need_dscale)
