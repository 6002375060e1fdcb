"""LyCORIS LoHa/LoKr → factored LoRA (lora_fusion.formats.lycoris), checked against the real libraries: PEFT's LoHa
and LoKr layers (their get_delta_weight) and lycoris-lora's own modules and functional API (get_weight, kron_weight).

scale·B·A must equal each library's update to 1e-5 relative; the shapes from the headers must agree with the factors.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lora_fusion.errors import CorruptAdapterError, NonFiniteError, UnsupportedAdapterError
from lora_fusion.formats.lycoris import (
    LYCORIS_SUFFIXES,
    LycorisShape,
    lycoris_factors,
    lycoris_kind,
    lycoris_shape,
)

MODULE, SOURCE = "lora_unet_down_blocks_0_attentions_0_to_q", "tiny.safetensors"


def _convert(tensors: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, LycorisShape, torch.Tensor, torch.Tensor]:
    """scale·B·A from lycoris_factors, the header shape, and A and B, after checking their bookkeeping agrees."""
    shape = lycoris_shape({k: tuple(v.shape) for k, v in tensors.items()}, module=MODULE, source=SOURCE)
    a, b, scale = lycoris_factors(tensors, module=MODULE, source=SOURCE)
    assert a.dtype == b.dtype == torch.float32 and isinstance(scale, float)
    assert a.shape == (shape.rank, shape.in_features) and b.shape == (shape.out_features, shape.rank)
    assert shape.rank <= min(shape.out_features, shape.in_features) or not shape.dense
    return scale * (b.double() @ a.double()), shape, a, b


def _assert_equal_update(ours: torch.Tensor, reference: torch.Tensor) -> None:
    reference = reference.detach().double().reshape(ours.shape)
    assert reference.abs().max() > 0, "the reference update is zero: the test would prove nothing"
    error = (ours - reference).abs().max() / reference.abs().max()
    assert error < 1e-5, f"relative error {error:.2e}"


def _randomise(module: nn.Module) -> None:
    # LyCORIS initialises one factor to zero; give every factor values so the update is non-trivial.
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.startswith(("hada_", "lokr_")):
                param.normal_(0, 0.5)


# --------------------------------------------------------------------------------------------- 1. against PEFT


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(64, 48)
        self.conv = nn.Conv2d(32, 24, 3)


_PEFT_NAMES = sorted(LYCORIS_SUFFIXES - {"alpha"})


def _peft_file_tensors(layer: nn.Module) -> dict[str, torch.Tensor]:
    """The LyCORIS file tensors of a PEFT LoHa/LoKr layer: same names, and (checked by
    test_peft_and_lycoris_store_the_same_shapes) the same shapes as lycoris', so no transposition."""
    tensors = {name: getattr(layer, name)["default"].detach().clone() for name in _PEFT_NAMES
               if hasattr(layer, name) and "default" in getattr(layer, name)}
    tensors["alpha"] = torch.tensor(float(layer.alpha["default"]))
    return tensors


@pytest.mark.parametrize(
    ("kind", "options"),
    [
        ("loha", dict(r=2, alpha=3)),
        ("loha", dict(r=3, alpha=1, use_effective_conv2d=True)),
        ("loha", dict(r=8, alpha=16)),  # linear 48×64: rank 64 > 48 -> dense
        ("lokr", dict(r=2, alpha=3)),
        ("lokr", dict(r=2, alpha=5, use_effective_conv2d=True)),
        ("lokr", dict(r=2, alpha=4, decompose_both=True)),
        ("lokr", dict(r=3, alpha=2, decompose_factor=4)),
        ("lokr", dict(r=1, alpha=2, decompose_both=True, decompose_factor=8, use_effective_conv2d=True)),
    ],
)
def test_matches_peft_delta_weight(kind: str, options: dict) -> None:
    from peft import LoHaConfig, LoKrConfig, get_peft_model

    torch.manual_seed(0)
    config_class = LoHaConfig if kind == "loha" else LoKrConfig
    config = config_class(target_modules=["lin", "conv"], init_weights=False, rank_dropout=0.0, **options)
    model = get_peft_model(_Tiny(), config)
    for name in ("lin", "conv"):
        layer = getattr(model.base_model.model, name)
        ours, shape, _, _ = _convert(_peft_file_tensors(layer))
        assert shape.kind == kind
        _assert_equal_update(ours, layer.get_delta_weight("default"))


def test_peft_lokr_with_both_sides_full_keeps_alpha_over_r_where_lycoris_uses_one() -> None:
    # A known difference between the libraries: PEFT's LoKrLayer.update_layer keeps alpha / r even when neither side
    # is factored, while LyCORIS (LokrModule.__init__) forces scale 1 then. A LyCORIS file follows LyCORIS.
    from peft import LoKrConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(_Tiny(), LoKrConfig(target_modules=["lin"], r=8, alpha=4, init_weights=False))
    layer = model.base_model.model.lin
    tensors = _peft_file_tensors(layer)
    assert "lokr_w1" in tensors and "lokr_w2" in tensors
    ours, _, _, _ = _convert(tensors)
    _assert_equal_update(ours * (4 / 8), layer.get_delta_weight("default"))


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_peft_and_lycoris_store_the_same_shapes(kind: str) -> None:
    from lycoris.modules.loha import LohaModule
    from lycoris.modules.lokr import LokrModule
    from peft import LoHaConfig, LoKrConfig, get_peft_model

    for tucker in (False, True):
        options = dict(r=2, alpha=1, use_effective_conv2d=tucker, init_weights=False, target_modules=["lin", "conv"])
        peft_model = get_peft_model(_Tiny(), (LoHaConfig if kind == "loha" else LoKrConfig)(**options))
        base = _Tiny()
        for name in ("lin", "conv"):
            module_class = LohaModule if kind == "loha" else LokrModule
            lyco = module_class("x", getattr(base, name), lora_dim=2, alpha=1, use_tucker=tucker)
            lyco_shapes = {k: tuple(v.shape) for k, v in lyco.state_dict().items() if k != "alpha"}
            peft_layer = getattr(peft_model.base_model.model, name)
            peft_shapes = {k: tuple(v.shape) for k, v in _peft_file_tensors(peft_layer).items() if k != "alpha"}
            assert peft_shapes == lyco_shapes


# --------------------------------------------------------------------------------------------- 2. against lycoris


def _lycoris_case(
    kind: str, base: nn.Module, *, drop_alpha: bool = False, **options: object
) -> tuple[dict[str, torch.Tensor], torch.Tensor, nn.Module]:
    from lycoris.modules.loha import LohaModule
    from lycoris.modules.lokr import LokrModule

    module = (LohaModule if kind == "loha" else LokrModule)("lora_unet_x", base, **options)
    _randomise(module)
    tensors = {k: v.detach().clone() for k, v in module.state_dict().items()}
    if drop_alpha:
        del tensors["alpha"]
    # get_weight(shape) is the update forward() adds (test_lycoris_forward_adds_get_weight); get_diff_weight
    # multiplies the scale in a second time in 4.1.3, so it is not the reference.
    with torch.no_grad():
        return tensors, module.get_weight(module.shape), module


LYCORIS_CASES: dict[str, tuple[str, Callable[[], nn.Module], dict, int, bool]] = {
    # name: (kind, base layer, options, expected rank, dense)
    "loha-linear": ("loha", lambda: nn.Linear(12, 10), dict(lora_dim=2, alpha=3), 4, False),
    "loha-linear-rslora": ("loha", lambda: nn.Linear(12, 10), dict(lora_dim=4, alpha=2, rs_lora=True), 10, True),
    "loha-conv": ("loha", lambda: nn.Conv2d(6, 5, 3), dict(lora_dim=2, alpha=1), 4, False),
    "loha-conv-tucker": ("loha", lambda: nn.Conv2d(6, 5, 3), dict(lora_dim=2, alpha=5, use_tucker=True), 4, False),
    "loha-dense": ("loha", lambda: nn.Linear(12, 8), dict(lora_dim=4, alpha=2), 8, True),
    "loha-no-alpha": ("loha", lambda: nn.Linear(12, 10), dict(lora_dim=2, alpha=None, drop_alpha=True), 4, False),
    # w1 full [6, 8] (rank 6) ⊗ w2 = [8, 2]·[2, 8]
    "lokr-full-w1": ("lokr", lambda: nn.Linear(64, 48), dict(lora_dim=2, alpha=3), 12, False),
    "lokr-both-factored": (
        "lokr", lambda: nn.Linear(64, 64), dict(lora_dim=2, alpha=3, decompose_both=True, factor=8), 4, False),
    # lora_dim 8 ≥ max(4, 4)/2: both sides full, scale 1 whatever alpha is
    "lokr-both-full": ("lokr", lambda: nn.Linear(16, 12), dict(lora_dim=8, alpha=5), 12, False),
    "lokr-no-alpha": (
        "lokr", lambda: nn.Linear(64, 48), dict(lora_dim=2, alpha=None, drop_alpha=True), 12, False),
    "lokr-conv": ("lokr", lambda: nn.Conv2d(32, 24, 3), dict(lora_dim=2, alpha=3), 8, False),
    "lokr-conv-tucker": ("lokr", lambda: nn.Conv2d(32, 24, 3), dict(lora_dim=2, alpha=3, use_tucker=True), 8, False),
    "lokr-conv-full-w2": ("lokr", lambda: nn.Conv2d(16, 12, 3), dict(lora_dim=2, alpha=3), 12, False),
    "lokr-conv-both-factored": (
        "lokr", lambda: nn.Conv2d(64, 64, 3), dict(lora_dim=2, alpha=3, decompose_both=True, factor=8), 4, False),
}


@pytest.mark.parametrize("case", list(LYCORIS_CASES))
def test_matches_lycoris_modules(case: str) -> None:
    kind, make_base, options, rank, dense = LYCORIS_CASES[case]
    torch.manual_seed(1)
    tensors, reference, module = _lycoris_case(kind, make_base(), **options)
    ours, shape, _, _ = _convert(tensors)
    _assert_equal_update(ours, reference)
    # 3. bookkeeping: the rank is the product of the halves' ranks (or the full rank when dense).
    assert (shape.kind, shape.rank, shape.dense) == (kind, rank, dense)
    out, n = reference.shape[0], reference[0].numel()
    assert (shape.out_features, shape.in_features) == (out, n)
    if "tucker" in case:
        assert shape.kernel == (3, 3)
    if options.get("alpha") is None or "both-full" in case:
        assert lycoris_factors(tensors, module=MODULE, source=SOURCE)[2] == 1.0


def test_lycoris_forward_adds_get_weight() -> None:
    # Justifies the reference above: the layer's own forward adds op(x, get_weight(shape)), scale once.
    from lycoris.modules.loha import LohaModule
    from lycoris.modules.lokr import LokrModule

    torch.manual_seed(2)
    for module_class, base, x in (
        (LohaModule, nn.Linear(12, 10), torch.randn(3, 12)),
        (LokrModule, nn.Conv2d(32, 24, 3), torch.randn(1, 32, 5, 5)),
    ):
        weight, bias = base.weight.detach().clone(), base.bias.detach().clone()
        module = module_class("x", base, lora_dim=2, alpha=3)
        _randomise(module)
        module.apply_to()
        with torch.no_grad():
            ours, _, _, _ = _convert(dict(module.state_dict()))
            op = F.linear if isinstance(base, nn.Linear) else F.conv2d
            delta = ours.float().reshape(weight.shape)
            torch.testing.assert_close(module(x), op(x, weight + delta, bias), rtol=1e-5, atol=1e-5)


def test_lokr_factored_rank_above_the_small_side_is_dense() -> None:
    # No LyCORIS trainer writes this (it would switch w2 to full), but a file can: w1 [4, 4] (rank 4) ⊗ w2 = [4, 5]·
    # [5, 16] gives rank 20 > min(16, 64). Reference: lycoris' functional kron_weight with scale alpha / 5.
    from lycoris.functional.lokr import kron_weight

    torch.manual_seed(3)
    w1, w2a, w2b = torch.randn(4, 4), torch.randn(4, 5), torch.randn(5, 16)
    tensors = {"lokr_w1": w1, "lokr_w2_a": w2a, "lokr_w2_b": w2b, "alpha": torch.tensor(2.0)}
    ours, shape, a, b = _convert(tensors)
    assert (shape.out_features, shape.in_features, shape.rank, shape.dense) == (16, 64, 16, True)
    assert torch.equal(b, torch.eye(16))  # out ≤ in: B = I, A = ΔW
    _assert_equal_update(ours, kron_weight(w1, None, None, None, w2a, w2b, None, scale=2.0 / 5))


def test_a_module_read_as_its_dense_update_is_announced_in_the_stats_of_what_is_written(tmp_path) -> None:
    """The LoKr module above, in a kohya file beside a plain one: the adapter's stats give its full rank and exact
    factored rank (none for the plain module), and a convert records both in the safetensors metadata and the card."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    from lora_fusion import convert, load_adapter

    torch.manual_seed(3)
    dense, plain = "lora_te_text_model_encoder_layers_0_self_attn_q_proj", "lora_te_text_model_encoder_layers_0_mlp_fc1"
    save_file({f"{dense}.lokr_w1": torch.randn(4, 4), f"{dense}.lokr_w2_a": torch.randn(4, 5),
               f"{dense}.lokr_w2_b": torch.randn(5, 16), f"{dense}.alpha": torch.tensor(2.0),
               f"{plain}.lora_down.weight": torch.randn(2, 16), f"{plain}.lora_up.weight": torch.randn(64, 2)},
              tmp_path / "mixed.safetensors")
    canonical = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
    adapter = load_adapter(tmp_path / "mixed.safetensors")
    assert {name: (s.rank, s.exact_rank) for name, s in adapter.stats.items()} == {canonical: (16, 20)}
    assert adapter.modules[canonical].rank == 16
    out = convert(adapter, to="peft", out=tmp_path / "out")
    with safe_open(str(out / "adapter_model.safetensors"), framework="pt") as file:
        record = json.loads(file.metadata()["lora_fusion"])
    assert record["modules"] == {canonical: {"rank": 16, "retained_energy": 1.0, "relative_error": 0.0,
                                             "exact_rank": 20}}
    card = (out / "README.md").read_text()
    table = f"| module | rank | exact factored rank |\n|---|---|---|\n| `{canonical}` | 16 | 20 |\n"
    assert table in card and card.index("## Sources") < card.index("## Modules at full rank")


def test_lokr_conv_with_a_4d_w2_b_and_a_kernel_from_the_file() -> None:
    # lycoris' functional weight_gen stores a conv w2_b as [r, d, kh, kw] (the module flattens it); both read alike.
    from lycoris.functional.lokr import kron_weight

    torch.manual_seed(4)
    w1, w2a, w2b = torch.randn(2, 3), torch.randn(4, 2), torch.randn(2, 5, 3, 3)
    tensors = {"lokr_w1": w1, "lokr_w2_a": w2a, "lokr_w2_b": w2b, "alpha": torch.tensor([1.0])}  # [1]: utils' layout
    ours, shape, _, _ = _convert(tensors)
    assert (shape.out_features, shape.in_features, shape.kernel, shape.rank) == (8, 135, (3, 3), 4)
    _assert_equal_update(ours, kron_weight(w1, None, None, None, w2a, w2b, None, scale=0.5))


def test_alpha_zero_means_alpha_equals_rank() -> None:
    torch.manual_seed(5)
    tensors = {"hada_w1_a": torch.randn(5, 2), "hada_w1_b": torch.randn(2, 7), "hada_w2_a": torch.randn(5, 2),
               "hada_w2_b": torch.randn(2, 7), "alpha": torch.tensor(0.0)}
    assert lycoris_factors(tensors, module=MODULE, source=SOURCE)[2] == 1.0
    assert lycoris_factors({**tensors, "alpha": torch.tensor(1.0)}, module=MODULE, source=SOURCE)[2] == 0.5


def test_kind_and_suffixes() -> None:
    assert lycoris_kind({"hada_w1_a", "hada_w1_b", "alpha"}) == "loha"
    assert lycoris_kind({"hada_w2_b"}) == "loha"
    assert lycoris_kind({"lokr_w1", "lokr_w2_a", "lokr_w2_b"}) == "lokr"
    assert lycoris_kind({"lora_down.weight", "lora_up.weight", "alpha"}) is None
    assert {"hada_t1", "hada_t2", "lokr_t2", "lokr_w1_a", "lokr_w2_b", "alpha"} <= LYCORIS_SUFFIXES


# --------------------------------------------------------------------------------------------- 4. bad input


def _loha(**changes: torch.Tensor | None) -> dict[str, torch.Tensor]:
    tensors = {"hada_w1_a": torch.randn(5, 2), "hada_w1_b": torch.randn(2, 7), "hada_w2_a": torch.randn(5, 2),
               "hada_w2_b": torch.randn(2, 7), "alpha": torch.tensor(1.0)}
    tensors.update(changes)
    return {k: v for k, v in tensors.items() if v is not None}


@pytest.mark.parametrize(
    ("tensors", "words"),
    [
        (_loha(hada_w2_b=None), "missing hada_w2_b"),
        (_loha(hada_w1_b=torch.randn(3, 7)), "inner ranks"),
        (_loha(hada_w2_a=torch.randn(5, 3), hada_w2_b=torch.randn(3, 7)), "different ranks"),
        (_loha(hada_w2_b=torch.randn(2, 8)), "different shapes"),
        (_loha(alpha=torch.tensor([1.0, 2.0])), "alpha of shape [2]"),
        (_loha(hada_t1=torch.randn(2, 2, 3, 3)), "missing hada_t2"),
        (_loha(lokr_w1=torch.randn(2, 2)), "lokr_w1"),
        ({"lokr_w1": torch.randn(2, 3), "alpha": torch.tensor(1.0)}, "missing lokr_w2_a, lokr_w2_b"),
        ({"lokr_w1_a": torch.randn(2, 2), "lokr_w1_b": torch.randn(3, 3), "lokr_w2": torch.randn(3, 3)}, "inner ranks"),
        ({"lokr_w1": torch.randn(2, 3), "lokr_w2_a": torch.randn(4, 2), "lokr_w2_b": torch.randn(2, 5),
          "lokr_t1": torch.randn(2, 2, 3, 3)}, "lokr_t1"),
    ],
)
def test_inconsistent_shapes_name_the_module(tensors: dict[str, torch.Tensor], words: str) -> None:
    headers = {k: tuple(v.shape) for k, v in tensors.items()}
    for call in (lambda: lycoris_shape(headers, module=MODULE, source=SOURCE),
                 lambda: lycoris_factors(tensors, module=MODULE, source=SOURCE)):
        with pytest.raises(CorruptAdapterError, match=MODULE) as caught:
            call()
        assert words in str(caught.value) and SOURCE in str(caught.value)


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_alpha_or_factor_names_the_module(value: float) -> None:
    with pytest.raises(CorruptAdapterError, match=f"{MODULE}: alpha"):
        lycoris_factors(_loha(alpha=torch.tensor(value)), module=MODULE, source=SOURCE)
    bad = torch.randn(2, 7)
    bad[1, 3] = value
    with pytest.raises(NonFiniteError, match=f"{MODULE}: factor hada_w2_b"):
        lycoris_factors(_loha(hada_w2_b=bad), module=MODULE, source=SOURCE)


def test_dora_scale_is_refused_as_unsupported() -> None:
    with pytest.raises(UnsupportedAdapterError, match="dora_scale"):
        lycoris_shape({**{k: tuple(v.shape) for k, v in _loha().items()}, "dora_scale": (5, 1)}, module=MODULE,
                      source=SOURCE)
