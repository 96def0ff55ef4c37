"""GPTQ (Frantar et al. 2022): second-order, layer-wise rounding of a weight against its input Hessian.

For a linear layer with calibration inputs X, GPTQ minimises ||W X - Q X||^2 over representable Q. It quantizes
one input column at a time and spreads each column's rounding error over the columns not yet quantized, using the
upper Cholesky factor U of the damped inverse Hessian (H + damp * mean(diag H) * I)^-1 = U^T U, with H = X X^T.
Updates are applied lazily per block of columns (one rank-`block` update of the remaining weight per block).

This module is the format-agnostic solver: the format supplies the rounding step (the nearest code of a column
given its group's scale and zero-point, or of a block of columns coded jointly) and the group parameters.

- act_order: columns are visited in order of decreasing Hessian diagonal (most active inputs first). The stored
  formats have no per-column group index, so act_order needs static groups: every group's parameters are computed
  from the original weight before any column is quantized.
- dynamic groups (static=False, without act_order): a group's parameters are computed when GPTQ reaches its first
  column, from the weight as already updated by the error of the previous groups (as in the reference code).
"""

from __future__ import annotations

import contextlib
import logging

import torch

logger = logging.getLogger(__name__)

_MAX_DAMP_RETRIES = 6


@contextlib.contextmanager
def single_thread():
    """GPTQ's column loop runs thousands of tiny ops: thread hand-offs cost more than they save (20x slower with 2
    threads on a loaded 2-core machine), so it runs on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def hessian_inverse_factor(hessian: torch.Tensor, damp: float, order: torch.Tensor | None = None
                           ) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of the damped inverse Hessian, and the relative damping that made it positive definite.

    The factor is of H[order][:, order] (the column visit order; None keeps H's), with dead channels (zero
    diagonal) given a unit diagonal; `hessian` itself is not modified. Damping starts at `damp` times the mean
    diagonal and grows tenfold while the factorisation fails (ill-conditioned or rank-deficient inputs).

    Memory: besides `hessian`, at most two n x n matrices are alive at once (the damped copy and its factor, then the
    factor and the inverse, then the inverse and its factor). For Llama-3-8B's down_proj (14336 inputs) each is
    0.8 GiB: an identity matrix or a kept intermediate would cost as much as a decoder block's float weights."""

    def prepared():
        H = hessian.detach()
        if order is not None:
            H = H[order]
            H = H[:, order]
        else:
            H = H.clone()
        diagonal = torch.diagonal(H)
        diagonal[diagonal == 0] = 1.0
        return H

    H = prepared()
    n = H.shape[0]
    mean_diag = torch.diagonal(H).mean().clamp_min(1e-12)
    rel = damp
    for _ in range(_MAX_DAMP_RETRIES):
        if H is None:  # a failed attempt consumed the damped copy
            H = prepared()
        torch.diagonal(H).add_(rel * mean_diag)  # H + rel * mean(diag H) * I, without the identity matrix
        chol, info = torch.linalg.cholesky_ex(H)
        H = None
        if info == 0:
            inverse = torch.cholesky_inverse(chol)
            chol = None
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            inverse = None
            if info == 0 and torch.isfinite(upper).all():
                if rel != damp:
                    logger.warning("GPTQ: Hessian not positive definite with damp=%g; used damp=%g", damp, rel)
                return upper, rel
            upper = None
        chol = None
        rel *= 10
    raise ValueError(
        f"GPTQ: the Hessian ({n}x{n}) is not positive definite even with damp={rel / 10:g}; the calibration inputs "
        "are degenerate (check the calibration data, or raise `damp`)"
    )


def check_inputs(weight: torch.Tensor, hessian: torch.Tensor) -> None:
    if weight.dim() != 2 or hessian.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(
            f"GPTQ needs weight [out, in] and Hessian [in, in], got {tuple(weight.shape)}, {tuple(hessian.shape)}"
        )
    if not torch.isfinite(weight).all():
        raise ValueError("weight contains NaN or Inf; refusing to quantize it")
    if not torch.isfinite(hessian).all():
        raise ValueError("GPTQ: the Hessian has NaN or Inf entries (the calibration activations overflowed)")


def _without_dead_inputs(weight, hessian):
    """Inputs that are always zero carry no information: their weights cannot change the output, so zero them (their
    codes then round 0); the Hessian gets a unit diagonal there so it stays invertible (hessian_inverse_factor), and
    that is the diagonal returned (the visit order of act_order). The Hessian is not copied here: at n x n it is
    the solver's largest tensor."""
    W = weight.detach().float().clone()
    diagonal = torch.diagonal(hessian.detach()).float().clone()
    dead = diagonal == 0
    diagonal[dead] = 1.0
    W[:, dead] = 0.0
    return W, diagonal


@torch.no_grad()
def gptq_columns(weight, hessian, group_size: int, round_column, *, static_params=None, dynamic_params=None,
                 has_zero: bool, damp: float = 0.01, act_order: bool = True, block_size: int = 128):
    """GPTQ of `weight` [out, in] on a per-weight scalar grid: (codes uint8 [out, in], scale [out, G], zero or None).

    round_column(w, s, z) -> (codes, decoded values) of one column given its group's scale/zero-point (z None when
    the format stores none). Group parameters come from `static_params(W) -> (scale, zero)` [out, G] (computed once,
    from the weight with dead inputs zeroed) or, without it, `dynamic_params(x [out, 1, g]) -> (s, z)` [out]
    (stored values) when GPTQ reaches each group."""
    check_inputs(weight, hessian)
    if act_order and static_params is None:
        raise ValueError("act_order=True needs static_groups=True: the stored formats have no per-column group index")
    with single_thread():
        return _gptq_columns(weight, hessian, group_size, round_column, static_params, dynamic_params, has_zero, damp,
                             act_order, block_size)


def _gptq_columns(weight, hessian, g, round_column, static_params, dynamic_params, has_zero, damp, act_order,
                  block_size):
    rows, cols = weight.shape
    n_groups = -(-cols // g)
    W, diagonal = _without_dead_inputs(weight, hessian)
    # Per-group parameters, codes and weight are held transposed ([group or column, row]): each step of the column
    # loop then reads and writes contiguous memory.
    scale = torch.empty(n_groups, rows, device=W.device)
    zero = torch.empty(n_groups, rows, device=W.device) if has_zero else None
    static = static_params is not None
    if static:
        s, z = static_params(W)
        scale.copy_(s.t())
        if zero is not None:
            zero.copy_(z.t())

    perm = torch.argsort(diagonal, descending=True) if act_order else None
    if perm is not None:
        W = W[:, perm]
    Hinv, _ = hessian_inverse_factor(hessian.float(), damp, perm)
    group_of = torch.arange(cols, device=W.device) // g
    if perm is not None:
        group_of = group_of[perm]
    codes = torch.empty(cols, rows, dtype=torch.uint8, device=W.device)
    Wt = W.t().contiguous()
    del W
    block = block_size if g >= cols else max(block_size // g, 1) * g  # groups never straddle a block
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1 = Wt[i1:i2].clone()
        Err1 = torch.empty_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            grp = int(group_of[col])
            if not static and col % g == 0:
                s, z = dynamic_params(W1[i : i + g].t().contiguous().unsqueeze(1))
                scale[grp] = s
                if zero is not None:
                    zero[grp] = z
            w = W1[i]
            q, deq = round_column(w, scale[grp], None if zero is None else zero[grp])
            codes[col] = q
            err = deq.sub_(w).neg_().div_(Hinv1[i, i])
            W1[i:].addr_(Hinv1[i, i:], err, alpha=-1)
            Err1[i] = err
        Wt[i2:].addmm_(Hinv[i1:i2, i2:].t(), Err1, alpha=-1)

    if perm is not None:
        codes = codes[torch.argsort(perm)]
    return codes.t().contiguous(), scale.t().contiguous(), None if zero is None else zero.t().contiguous()


@torch.no_grad()
def gptq_blockwise(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    width: int,
    round_block,
    *,
    damp: float = 0.01,
    act_order: bool = True,
    block_size: int = 128,
) -> None:
    """GPTQ's error feedback for formats that round `width` consecutive input columns jointly (a VQ vector, or
    width 1 for per-weight codes that are not a scalar grid, such as trit pairs).

    `round_block(j, x, metric)` rounds input columns [j * width, j * width + width) (the last block may be
    shorter): x [out, w] is their current, error-updated weight, and it returns the decoded values [out, w] it
    chose (recording its codes itself). The choice should minimise ||(x - q) @ metric||^2 per row: metric = U^-1
    for the block's w x w block U of the inverse Hessian's upper Cholesky factor, which is exactly the output
    error that fixing these columns adds (GPTQ's err / U_ii for width 1; the joint form of GPTVQ for vectors).
    act_order visits blocks by decreasing summed Hessian diagonal; columns of a block stay together."""
    check_inputs(weight, hessian)
    with single_thread():
        _gptq_blockwise(weight, hessian, width, round_block, damp, act_order, block_size)


def _gptq_blockwise(weight, hessian, width, round_block, damp, act_order, block_size) -> None:
    cols = weight.shape[1]
    W, diag = _without_dead_inputs(weight, hessian)
    spans = [(j, j * width, min(j * width + width, cols)) for j in range(-(-cols // width))]
    if act_order:
        spans.sort(key=lambda sp: -float(diag[sp[1] : sp[2]].sum()))
    perm = torch.cat([torch.arange(a, b) for _, a, b in spans]).to(W.device)
    W = W[:, perm]
    Hinv, _ = hessian_inverse_factor(hessian.float(), damp, perm)
    per_block = max(block_size // width, 1)
    pos = 0
    for b0 in range(0, len(spans), per_block):
        chunk = spans[b0 : b0 + per_block]
        i1, i2 = pos, pos + sum(b - a for _, a, b in chunk)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.empty_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        lo = 0
        for j, a, b in chunk:
            hi = lo + (b - a)
            metric = torch.linalg.solve_triangular(
                Hinv1[lo:hi, lo:hi], torch.eye(hi - lo, device=W.device), upper=True)
            x = W1[:, lo:hi]
            err = (x - round_block(j, x.clone(), metric)) @ metric
            W1[:, hi:].addmm_(err, Hinv1[lo:hi, hi:], alpha=-1)
            Err1[:, lo:hi] = err
            lo = hi
        W[:, i2:].addmm_(Err1, Hinv[i1:i2, i2:], alpha=-1)
        pos = i2


@torch.no_grad()
def refit_group_params(weight, hessian, unit, group_size: int, scale, offset=None, *, damp: float = 0.01,
                       round_params=None, rowwise: bool = True, chunk_elements: int = 1 << 23):
    """Least-squares refit of the group parameters GPTQ rounded against, its codes kept.

    GPTQ (as in the paper and its peers) fixes each group's scale and zero-point from the weight alone, then spends
    its error feedback around them. With the codes fixed, a decoded weight is linear in its group's parameters,
    w_hat = scale * unit - offset: `unit` [out, in] is each code's value at unit scale (q for affine integers, whose
    offset is scale * zero; q - 2**(b-1) for symmetric ones and the table entry for codebooks, which have no offset:
    `offset` None). So the layer's output error on the calibration inputs, tr((W - W_hat) H (W - W_hat)^T) with
    GPTQ's damped H, is a quadratic in each row's parameters, minimised exactly: per row, normal equations in the
    2G (or G) parameters of its G groups, built from H block by block (out * in^2 multiply-adds) and solved batched.

    `round_params(scale, offset) -> (scale, offset)` rounds the whole [out, G] tensors to what storage holds. The
    new parameters replace the old per row (`rowwise`; elementwise rounding) or for the whole weight (rounding that
    couples rows, such as double-quantized scales) only where they lower the error and every scale stays positive,
    so the layer error never grows. Returns (scale, offset or None, relative layer error before, after), the errors
    relative to tr(W H W^T)."""
    rows, cols = weight.shape
    g = group_size
    n_groups = -(-cols // g)
    padded = n_groups * g
    W, _ = _without_dead_inputs(weight, hessian)
    H = hessian.detach().float().clone()
    diagonal = torch.diagonal(H)
    diagonal[diagonal == 0] = 1.0
    diagonal.add_(damp * diagonal.mean())  # the objective GPTQ solved

    def pad(x):
        return torch.nn.functional.pad(x, (0, padded - cols)) if padded != cols else x

    # [padded, padded], zero outside the weight; H itself when nothing is padded (an in x in copy is ~0.8 GiB at 14336)
    Hp = H if padded == cols else pad(pad(H).t()).t().contiguous()
    Hg = Hp.view(padded, n_groups, g).permute(1, 0, 2)  # [h, c, d]: H[c, column d of group h]
    mask = pad(torch.ones(cols, device=W.device)).view(n_groups, g)  # padding columns decode to nothing
    U = pad(unit.float())
    WH = W @ H  # [rows, cols], also the scale of the objective below
    HW = pad(WH)
    has_offset = offset is not None
    if has_offset:
        # the offset's column of the design is -1 on the group's columns: its products with H are row-independent
        HV = -(Hp.view(padded, n_groups, g) * mask).sum(-1)  # [c, h]
        M_bb = -(mask.unsqueeze(-1) * HV.view(n_groups, g, n_groups)).sum(1)
    k = 2 * n_groups if has_offset else n_groups
    solved = torch.empty(rows, k, device=W.device)
    step = max(1, chunk_elements // (padded * n_groups))
    for r0 in range(0, rows, step):
        r1 = min(r0 + step, rows)
        R = r1 - r0
        Ug = U[r0:r1].view(R, n_groups, g)
        HU = torch.bmm(Hg, Ug.permute(1, 2, 0)).permute(2, 1, 0).reshape(R, n_groups, g, n_groups)
        M = torch.empty(R, k, k, device=W.device)
        M[:, :n_groups, :n_groups] = torch.einsum("rgc,rgch->rgh", Ug, HU)
        hw = HW[r0:r1].view(R, n_groups, g)
        rhs = [(Ug * hw).sum(-1)]
        theta0 = [scale[r0:r1].float()]
        if has_offset:
            M_ab = torch.einsum("rgc,gch->rgh", Ug, HV.view(n_groups, g, n_groups))
            M[:, :n_groups, n_groups:] = M_ab
            M[:, n_groups:, :n_groups] = M_ab.transpose(1, 2)
            M[:, n_groups:, n_groups:] = M_bb
            rhs.append(-(mask * hw).sum(-1))
            theta0.append(offset[r0:r1].float())
        rhs, theta0 = torch.cat(rhs, 1), torch.cat(theta0, 1)
        # A group whose codes are all equal makes its scale and offset collinear: a small relative ridge toward the
        # old values keeps M invertible and such a group where it was.
        ridge = 1e-6 * torch.diagonal(M, dim1=1, dim2=2).clamp_min(1e-30)
        M.diagonal(dim1=1, dim2=2).add_(ridge)
        solved[r0:r1] = torch.linalg.solve(M, (rhs + ridge * theta0).unsqueeze(-1)).squeeze(-1)
    new_scale = solved[:, :n_groups]
    new_offset = solved[:, n_groups:] if has_offset else None
    if round_params is not None:
        new_scale, new_offset = round_params(new_scale, new_offset)

    def row_errors(s, o):
        w_hat = U * s.repeat_interleave(g, 1)
        if o is not None:
            w_hat = w_hat - o.repeat_interleave(g, 1) * mask.view(1, padded)
        E = W - w_hat[:, :cols]
        return ((E @ H) * E).sum(-1)

    before = row_errors(scale.float(), None if offset is None else offset.float())
    after = row_errors(new_scale, new_offset)
    ok = (new_scale > 0).all(-1) & torch.isfinite(after)
    better = ok & (after < before) if rowwise else (ok.all() & (after.sum() < before.sum())).expand(rows)
    total = float((WH * W).sum()) or 1.0
    chosen = torch.where(better, after, before)
    keep = ~better.unsqueeze(-1)
    new_scale = torch.where(keep, scale.float(), new_scale)
    if has_offset:
        new_offset = torch.where(keep, offset.float(), new_offset)
    return new_scale, new_offset, float(before.sum()) / total, float(chosen.sum()) / total


__all__ = ["check_inputs", "gptq_blockwise", "gptq_columns", "hessian_inverse_factor", "refit_group_params",
           "single_thread"]
