"""LyCORIS LoHa and LoKr modules (`hada_*` / `lokr_*` tensors in kohya-style files) converted EXACTLY into the
canonical factored LoRA form ΔW = scale·B·A (B [out, rank], A [rank, in·∏kernel]), without any SVD.

The conventions below were read from lycoris-lora 4.1.3 and PEFT 0.21.2 and are checked numerically against both
libraries in tests/test_lycoris.py:

* LoHa, plain (linear, or a conv flattened): ΔW = (w1_a·w1_b) ⊙ (w2_a·w2_b), `hada_wX_a` [out, r], `hada_wX_b`
  [r, in·∏k] (lycoris/functional/loha.py:_diff_weight; PEFT tuners/loha/layer.py:make_weight, same shapes).
  Tucker (`hada_tX` [r, r, *k], `hada_wX_a` [r, out], `hada_wX_b` [r, in]): half X is
  einsum("i j ..., j c, i o -> o c ...", t, w_b, w_a) (lycoris/functional/loha.py:HadaWeightTucker.forward; PEFT
  tuners/loha/layer.py:HadaWeightCP.forward).
* LoKr: ΔW = kron(W1, W2), W1 = `lokr_w1` or `lokr_w1_a`·`lokr_w1_b` (2-D), W2 = `lokr_w2` [b, d, *k] or
  `lokr_w2_a` [b, r]·`lokr_w2_b` [r, d·∏k], or Tucker: einsum("i j ..., i p, j r -> p r ...", t2, w2_a [r, b],
  w2_b [r, d]) (lycoris/functional/lokr.py:_kron_weight, make_kron; lycoris/functional/general.py:rebuild_tucker;
  PEFT tuners/lokr/layer.py:get_delta_weight). make_kron gives W1 trailing unit axes, so the conv update
  [a·b, c·d, *k] flattened to (out, in·∏k) is exactly kron(W1, W2 flattened to [b, d·∏k]).
* Scale (the file's `alpha` already holds alpha·√r under rs_lora: LohaModule/LokrModule.__init__ register
  alpha·(r / √r), so alpha/r is the trained scale in both cases):
  - LoHa: alpha / r with r = hada_w1_b.shape[0] (lycoris/modules/loha.py:LohaModule.make_module_from_state_dict and
    __init__: scale = alpha / lora_dim; PEFT tuners/loha/layer.py:LoHaLayer.update_layer: alpha / r).
  - LoKr: alpha / r where r is the rank of the factored side (w1 first, then w2), and 1 when both sides are full
    (lycoris/modules/lokr.py:LokrModule.__init__ forces alpha = lora_dim when use_w1 and use_w2;
    make_module_from_state_dict takes lora_dim from w1_a, else w2_a). For a Tucker w2 the rank is t2.shape[0] =
    w2_a.shape[0]: that is LokrModule.__init__'s lora_dim and PEFT's r; lycoris' loader and functional
    rank_scale read w2_a.size(1), which for Tucker is the output size b, not the rank (a lycoris 4.1.3 bug: its
    functional diff_weight then scales by alpha / b, and make_module_from_state_dict cannot rebuild the module).
  - A missing alpha, or alpha 0, means alpha = r (scale 1): LohaModule/LokrModule.__init__ `alpha = lora_dim if
    alpha is None or alpha == 0`, as kohya's LoRA. (PEFT has no file alpha: its LoKr keeps alpha / r even with
    both sides full, a convention a LyCORIS file cannot express.)
* Exact factorisations: LoHa uses (B₁A₁) ⊙ (B₂A₂) = (B₁ ⊙ᵣ B₂)(A₁ ⊙꜀ A₂) (face-splitting products, rank r₁r₂);
  LoKr uses (U₁V₁) ⊗ (U₂V₂) = (U₁⊗U₂)(V₁⊗V₂), a full factor W [o, i] written as I_o·W (o ≤ i) or W·I_i. When that
  rank exceeds min(out, in), the dense ΔW itself is returned at full rank (I·ΔW or ΔW·I) and the shape says so.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Literal

import torch

from ..errors import CorruptAdapterError, NonFiniteError, UnsupportedAdapterError
from ..spec import all_finite

LycorisKind = Literal["loha", "lokr"]

_LOHA_TENSORS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
_LOKR_TENSORS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
LYCORIS_SUFFIXES: frozenset[str] = frozenset((*_LOHA_TENSORS, *_LOKR_TENSORS, "alpha"))


def lycoris_kind(suffixes: Collection[str]) -> LycorisKind | None:
    """Which LyCORIS algorithm a module's tensor suffixes belong to (None: not LyCORIS).

    Any `hada_*` suffix makes it LoHa and any `lokr_*` suffix LoKr, so a module missing its first factor is still
    recognised (and then refused by [`lycoris_shape`] with the missing name) rather than silently skipped. A module
    with both families reads as LoHa, the order lycoris' own loader tries them (lycoris/modules/__init__.py:
    MODULE_LIST); [`lycoris_shape`] then refuses the stray `lokr_*` tensors.
    """
    if any(s.startswith("hada_") for s in suffixes):
        return "loha"
    if any(s.startswith("lokr_") for s in suffixes):
        return "lokr"
    return None


@dataclass(frozen=True)
class LycorisShape:
    """One LyCORIS module described from its tensor shapes alone.

    Attributes:
        kind: "loha" or "lokr".
        out_features: rows of the flattened update.
        in_features: columns of the flattened update (in_channels·kh·kw for a conv).
        kernel: the conv kernel when the file records it (a Tucker core, a 4-D `lokr_w2`, a ≥3-D `*_b` factor);
            () for a linear layer, and also for a conv whose factors the file stores flattened to [r, in·kh·kw]:
            the file alone does not say kh·kw then, and the caller takes the kernel from the base layer.
        rank: the rank of the factored form [`lycoris_factors`] returns: the exact rank (r₁·r₂), or
            min(out_features, in_features) when `dense`.
        dense: the exact factored rank exceeded min(out_features, in_features), so the dense update is returned
            in factored form at full rank instead.
        exact_rank: the rank of the exact factored form (r₁·r₂), `rank` unless `dense`.
    """

    kind: LycorisKind
    out_features: int
    in_features: int
    kernel: tuple[int, ...]
    rank: int
    dense: bool
    exact_rank: int


@dataclass(frozen=True)
class _Layout:
    shape: LycorisShape
    # The r of the scale alpha / r; None when the scale is 1 whatever alpha says (LoKr with both sides full).
    scale_rank: int | None


def lycoris_shape(headers: Mapping[str, tuple[int, ...]], *, module: str, source: str) -> LycorisShape:
    """From the tensor shapes alone (suffix -> shape, no data read): validate and describe the module.

    Args:
        headers: each of the module's tensor suffixes (`hada_w1_a`, `alpha`, …) mapped to its shape.
        module: the module's name, for messages.
        source: what the user called the adapter, for messages.

    Raises:
        CorruptAdapterError: a missing factor (e.g. `hada_w2_b` absent), shapes that do not multiply or disagree,
            a tensor LyCORIS does not write for this algorithm, or a non-scalar alpha; the message names `source`
            and `module`.
        UnsupportedAdapterError: a `dora_scale` (weight-decomposed LyCORIS needs the base weights to merge).
    """
    return _layout(headers, module=module, source=source).shape


def lycoris_factors(
    tensors: Mapping[str, torch.Tensor], *, module: str, source: str
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A, B, scale) in canonical form, float32: A [rank, in_features], B [out_features, rank], with scale·B·A equal
    to the module's ΔW exactly (float rounding only). Shapes and rank are those of [`lycoris_shape`].

    The products are formed in float64 and rounded once to float32: every entry of a face-splitting or Kronecker
    product is a product of two file values (at most 24 + 24 significant bits, exact in float64's 53), so A and B
    are the correctly rounded float32 of the exact factors; the Tucker contraction and a dense ΔW are sums, which
    float64 keeps well below float32's rounding.

    Raises:
        CorruptAdapterError: as [`lycoris_shape`], or an alpha that is NaN, Inf or not a scalar (naming the
            module); `NonFiniteError` (a subclass) for NaN or Inf in a factor.
        UnsupportedAdapterError: as [`lycoris_shape`].
    """
    layout = _layout({key: tuple(value.shape) for key, value in tensors.items()}, module=module, source=source)
    shape = layout.shape
    values = {key: value.detach().to(device="cpu", dtype=torch.float64) for key, value in tensors.items()}
    for key, value in values.items():
        if not all_finite(value):
            what = "alpha" if key == "alpha" else f"factor {key}"
            error = CorruptAdapterError if key == "alpha" else NonFiniteError
            raise error(
                f"{source}: module {module}: {what} holds NaN or Inf; the adapter is corrupted or diverged in "
                "training. Re-download it, or leave it out of the merge."
            )
    scale = _scale(values.get("alpha"), layout.scale_rank)
    if shape.kind == "loha":
        (b1, a1), (b2, a2) = (_hada_half(values, i, shape.out_features, shape.in_features) for i in (1, 2))
        # Face-splitting products: row i of B is kron(B1[i], B2[i]), column j of A is kron(A1[:, j], A2[:, j]),
        # so (B·A)[i, j] = Σ_pq B1[i,p]B2[i,q]A1[p,j]A2[q,j] = (B1A1)[i, j]·(B2A2)[i, j].
        b = (b1[:, :, None] * b2[:, None, :]).reshape(shape.out_features, -1)
        a = (a1[:, None, :] * a2[None, :, :]).reshape(-1, shape.in_features)
    else:
        u1, v1 = _lokr_w1(values)
        u2, v2 = _lokr_w2(values)
        # Mixed-product property: (U1V1) ⊗ (U2V2) = (U1⊗U2)(V1⊗V2); torch.kron's ordering is the one make_kron uses.
        # (torch.kron views its inputs, so a transposed Tucker factor is made contiguous first.)
        u1, v1, u2, v2 = (m.contiguous() for m in (u1, v1, u2, v2))
        b, a = torch.kron(u1, u2), torch.kron(v1, v2)
    if shape.dense:
        # A rank above min(out, in) only costs space: the update itself, at full rank, is the smaller exact form.
        delta = b @ a
        eye = torch.eye(min(shape.out_features, shape.in_features), dtype=delta.dtype)
        b, a = (eye, delta) if shape.out_features <= shape.in_features else (delta, eye)
    return a.to(torch.float32).contiguous(), b.to(torch.float32).contiguous(), scale


# --------------------------------------------------------------------------------------------- shapes


def _layout(headers: Mapping[str, tuple[int, ...]], *, module: str, source: str) -> _Layout:
    def fail(problem: str) -> CorruptAdapterError:
        return CorruptAdapterError(
            f"{source}: LyCORIS module {module} {problem}. The file is damaged or was not written by LyCORIS or "
            "PEFT; re-export or re-download it, or leave the adapter out."
        )

    headers = {key: tuple(int(d) for d in shape) for key, shape in headers.items()}
    if "dora_scale" in headers:
        raise UnsupportedAdapterError(
            f"{source}: LyCORIS module {module} has a dora_scale (weight-decomposed LoHa/LoKr): its update depends "
            "on the base weights and cannot be merged as a low-rank factor. Bake it into the base model instead."
        )
    kind = lycoris_kind(headers)
    if kind is None:
        raise fail(f"has no LoHa (hada_*) or LoKr (lokr_*) tensors (it has {', '.join(sorted(headers)) or 'none'})")
    own = _LOHA_TENSORS if kind == "loha" else _LOKR_TENSORS
    stray = sorted(set(headers) - set(own) - {"alpha"})
    if stray:
        # lokr_t1 is in lycoris' weight_list but no LokrModule creates it and the loader drops it: refuse rather
        # than silently merge a different update than the file's author saw.
        raise fail(f"is {kind} but also has {', '.join(stray)}, which {kind} does not use")
    if "alpha" in headers and math.prod(headers["alpha"]) != 1:
        raise fail(f"has an alpha of shape {list(headers['alpha'])}; alpha must be a single number")
    out, n, kernel, exact, scale_rank = (_loha_shape if kind == "loha" else _lokr_shape)(headers, fail)
    dense = exact > min(out, n)
    return _Layout(LycorisShape(kind, out, n, kernel, min(out, n) if dense else exact, dense, exact), scale_rank)


_Fail = Callable[[str], CorruptAdapterError]
_Shapes = tuple[int, int, tuple[int, ...], int, int | None]  # out, in, kernel, exact rank, scale rank


def _require(headers: Mapping[str, tuple[int, ...]], names: Collection[str], fail: _Fail) -> None:
    missing = [name for name in names if name not in headers]
    if missing:
        raise fail(f"is missing {', '.join(missing)}")


def _dims(
    headers: Mapping[str, tuple[int, ...]], name: str, ndim: int | tuple[int, int], fail: _Fail
) -> tuple[int, ...]:
    """The shape of `name`, checked to have `ndim` axes (or between the two bounds), none of them empty."""
    shape = headers[name]
    low, high = (ndim, ndim) if isinstance(ndim, int) else ndim
    if not low <= len(shape) <= high or 0 in shape:
        want = f"{low}" if low == high else f"{low} to {high}"
        raise fail(f"has {name} of shape {list(shape)}; expected {want} non-empty axes")
    return shape


def _mismatch(fail: _Fail, what: str, **shapes: tuple[int, ...]) -> CorruptAdapterError:
    listed = ", ".join(f"{name} {list(shape)}" for name, shape in shapes.items())
    return fail(f"has {what} ({listed})")


def _loha_shape(headers: Mapping[str, tuple[int, ...]], fail: _Fail) -> _Shapes:
    tucker = "hada_t1" in headers or "hada_t2" in headers
    _require(headers, _LOHA_TENSORS if tucker else _LOHA_TENSORS[:4], fail)
    halves = []
    for i in (1, 2):
        a_name, b_name, t_name = f"hada_w{i}_a", f"hada_w{i}_b", f"hada_t{i}"
        if tucker:
            # Tucker: t [r, r, *k], w_a [r, out] (1-mode), w_b [r, in] (2-mode); LohaModule.__init__ (use_tucker).
            t = _dims(headers, t_name, (3, 5), fail)
            a, b = _dims(headers, a_name, 2, fail), _dims(headers, b_name, 2, fail)
            if not t[0] == t[1] == a[0] == b[0]:
                raise _mismatch(fail, "Tucker ranks that disagree", **{t_name: t, a_name: a, b_name: b})
            halves.append((a[1], b[1] * math.prod(t[2:]), t[2:], b[0]))
        else:
            # w_a [out, r] (a conv's may carry trailing unit axes: lycoris reshapes it to (-1, r)), w_b [r, in, *k].
            a, b = _dims(headers, a_name, (2, 4), fail), _dims(headers, b_name, (2, 5), fail)
            if any(d != 1 for d in a[2:]) or a[1] != b[0]:
                raise _mismatch(fail, "factors whose inner ranks do not match", **{a_name: a, b_name: b})
            halves.append((a[0], math.prod(b[1:]), b[2:], b[0]))
    (out1, n1, k1, r1), (out2, n2, k2, r2) = halves
    if (out1, n1) != (out2, n2) or (k1 and k2 and k1 != k2):
        raise fail(f"has Hadamard halves of different shapes ({out1}×{n1} and {out2}×{n2})")
    if r1 != r2:
        # LyCORIS and PEFT train both halves at one rank; the scale alpha / r would be ambiguous otherwise.
        raise fail(f"has Hadamard halves of different ranks ({r1} and {r2}); LyCORIS trains both at one rank")
    # Scale rank: hada_w1_b.shape[0] (LohaModule.make_module_from_state_dict), the same axis in both layouts.
    return out1, n1, k1 or k2, r1 * r2, headers["hada_w1_b"][0]


def _lokr_shape(headers: Mapping[str, tuple[int, ...]], fail: _Fail) -> _Shapes:
    if "lokr_w1" in headers:
        if "lokr_w1_a" in headers or "lokr_w1_b" in headers:
            raise fail("has both lokr_w1 and its factors lokr_w1_a/lokr_w1_b; keep one")
        rows1, cols1 = _dims(headers, "lokr_w1", 2, fail)
        rank1, r1 = min(rows1, cols1), None
    else:
        _require(headers, ("lokr_w1_a", "lokr_w1_b"), fail)
        a, b = _dims(headers, "lokr_w1_a", 2, fail), _dims(headers, "lokr_w1_b", 2, fail)
        if a[1] != b[0]:
            raise _mismatch(fail, "factors whose inner ranks do not match", lokr_w1_a=a, lokr_w1_b=b)
        rows1, cols1, rank1 = a[0], b[1], a[1]
        r1 = rank1
    if "lokr_w2" in headers:
        if any(name in headers for name in ("lokr_w2_a", "lokr_w2_b", "lokr_t2")):
            raise fail("has both lokr_w2 and factors of it (lokr_w2_a/lokr_w2_b/lokr_t2); keep one")
        w2 = _dims(headers, "lokr_w2", (2, 5), fail)
        rows2, cols2, kernel = w2[0], math.prod(w2[1:]), w2[2:]
        rank2, r2 = min(rows2, cols2), None
    elif "lokr_t2" in headers:
        # Tucker: t2 [r, r, *k], w2_a [r, b], w2_b [r, d] (LokrModule.__init__, use_tucker; rebuild_tucker).
        _require(headers, ("lokr_w2_a", "lokr_w2_b"), fail)
        t = _dims(headers, "lokr_t2", (3, 5), fail)
        a, b = _dims(headers, "lokr_w2_a", 2, fail), _dims(headers, "lokr_w2_b", 2, fail)
        if not t[0] == t[1] == a[0] == b[0]:
            raise _mismatch(fail, "Tucker ranks that disagree", lokr_t2=t, lokr_w2_a=a, lokr_w2_b=b)
        rows2, cols2, kernel, rank2 = a[1], b[1] * math.prod(t[2:]), t[2:], t[0]
        r2 = rank2
    else:
        _require(headers, ("lokr_w2_a", "lokr_w2_b"), fail)
        a, b = _dims(headers, "lokr_w2_a", 2, fail), _dims(headers, "lokr_w2_b", (2, 5), fail)
        if a[1] != b[0]:
            raise _mismatch(fail, "factors whose inner ranks do not match", lokr_w2_a=a, lokr_w2_b=b)
        rows2, cols2, kernel, rank2 = a[0], math.prod(b[1:]), b[2:], a[1]
        r2 = rank2
    if r1 is not None and r2 is not None and r1 != r2:
        # LokrModule.make_module_from_state_dict builds both sides at w1_a's rank; PEFT uses one r as well.
        raise fail(f"has Kronecker factors of different ranks ({r1} and {r2}); LyCORIS trains both at one rank")
    # Scale rank: the factored side's (w1 first, as make_module_from_state_dict); None (scale 1) when both are full.
    return rows1 * rows2, cols1 * cols2, kernel, rank1 * rank2, r1 if r1 is not None else r2


# --------------------------------------------------------------------------------------------- factors


def _scale(alpha: torch.Tensor | None, scale_rank: int | None) -> float:
    # LohaModule/LokrModule.__init__: `alpha = lora_dim if alpha is None or alpha == 0`, so both mean scale 1.
    if alpha is None or scale_rank is None:
        return 1.0
    value = float(alpha.reshape(-1)[0])
    return 1.0 if value == 0 else value / scale_rank


def _hada_half(values: Mapping[str, torch.Tensor], i: int, out: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Hadamard half `i` as an exact product B [out, r] · A [r, n]."""
    a, b = values[f"hada_w{i}_a"], values[f"hada_w{i}_b"]
    t = values.get(f"hada_t{i}")
    if t is None:
        rank = b.shape[0]
        return a.reshape(out, rank), b.reshape(rank, n)
    # The core carries the kernel axes, which belong to the input side: absorb it into A, keep w_a (transposed) as B.
    # A[i, c, *k] = Σ_j t[i, j, *k]·w_b[j, c], flattened (c, *k) as a conv weight [out, in, *k] flattens.
    return a.T, torch.einsum("ij...,jc->ic...", t, b).reshape(t.shape[0], n)


def _full(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A full matrix W [o, i] as an exact product U·V of rank min(o, i), no SVD: I_o·W or W·I_i."""
    rows, cols = w.shape
    if rows <= cols:
        return torch.eye(rows, dtype=w.dtype), w
    return w, torch.eye(cols, dtype=w.dtype)


def _lokr_w1(values: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    if "lokr_w1" in values:
        return _full(values["lokr_w1"])
    return values["lokr_w1_a"], values["lokr_w1_b"]


def _lokr_w2(values: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """W2 flattened to [b, d·∏k] as an exact product U2·V2; kron(W1, that) is the flattened conv update."""
    if "lokr_w2" in values:
        w2 = values["lokr_w2"]
        return _full(w2.reshape(w2.shape[0], -1))
    a, b = values["lokr_w2_a"], values["lokr_w2_b"]
    t = values.get("lokr_t2")
    if t is None:
        return a, b.reshape(b.shape[0], -1)
    # rebuild_tucker: W2[p, r, *k] = Σ_ij t[i, j, *k]·w2_a[i, p]·w2_b[j, r]; U2 = w2_aᵀ, V2 = the core times w2_b.
    return a.T, torch.einsum("ij...,jd->id...", t, b).reshape(t.shape[0], -1)
