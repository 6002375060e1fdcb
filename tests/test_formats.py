"""Diffusion LoRA files in and out (issue 14): diffusers, kohya/A1111 (SD and SDXL's SGM names), kohya Flux, LyCORIS,
`convert`, `merge --format`, and merges across formats, on tiny diffusers models built here.

LoRAs are made with PEFT and saved with diffusers' own `save_lora_weights` / `convert_state_dict_to_kohya`, or
with the independent SGM key map written in this file; every output is loaded back with diffusers and compared,
in float32, with the forward of the PEFT-injected model (base + ΔW).
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lora_fusion import convert, load_adapter, merge
from lora_fusion.errors import (
    AmbiguousSourceError,
    CorruptAdapterError,
    IncompatibleAdaptersError,
    NotALoraAdapterError,
    OutputProtectedError,
    UnsupportedAdapterError,
)
from tests.test_cli import assert_user_error, invoke

pytest.importorskip("diffusers")  # the [diffusers] extra is part of the test install (make test)

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.0.proj", "conv1", "time_emb_proj"]
# diffusers 0.42.1 infers the text encoder's key style from `out_proj` (to_out_lora): a kohya text-encoder LoRA
# without it does not load into diffusers, so the tests train all four attention projections, as trainers do.
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1"]


class TinyPipeline:
    """What `load_lora_weights` needs of a pipeline: its unet and text encoder (and no device map)."""

    hf_device_map = None

    def __init__(self, unet, text_encoder):
        self.unet, self.text_encoder = unet, text_encoder

    @property
    def components(self):
        return {"unet": self.unet, "text_encoder": self.text_encoder}


def _pipeline_class():
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    return type("TinySD", (TinyPipeline, StableDiffusionLoraLoaderMixin), {})


def tiny_unet(seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=4,
    ).eval()


def tiny_text_encoder(seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1)
    return CLIPTextModel(config).eval()


class TinySDXLPipeline(TinyPipeline):
    """And a second text encoder, as SDXL's."""

    def __init__(self, unet, text_encoder, text_encoder_2):
        super().__init__(unet, text_encoder)
        self.text_encoder_2 = text_encoder_2

    @property
    def components(self):
        return {**super().components, "text_encoder_2": self.text_encoder_2}


def _sdxl_pipeline_class():
    from diffusers.loaders import StableDiffusionXLLoraLoaderMixin

    return type("TinySDXL", (TinySDXLPipeline, StableDiffusionXLLoraLoaderMixin), {})


def with_lora(model, targets: list[str], *, r: int, alpha: float, seed: int):
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=alpha, init_lora_weights=False, target_modules=targets)
    lora = inject_adapter_in_model(config, copy.deepcopy(model))
    return lora, config


def peft_deltas(model, component: str) -> dict[str, torch.Tensor]:
    """PEFT's own ΔW of every LoRA layer, flattened to out × in·k·k, by canonical name."""
    from peft.tuners.lora import LoraLayer

    return {f"{component}.{name}": module.get_delta_weight("default").flatten(1).float()
            for name, module in model.named_modules() if isinstance(module, LoraLayer)}


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """A tiny SD model, a PEFT LoRA on its UNet (convs included) and text encoder, saved by diffusers."""
    from peft import get_peft_model_state_dict

    unet, text = tiny_unet(), tiny_text_encoder()
    lora_unet, unet_config = with_lora(unet, UNET_TARGETS, r=4, alpha=8, seed=1)
    lora_text, text_config = with_lora(text, TEXT_TARGETS, r=2, alpha=3, seed=2)
    folder = tmp_path_factory.mktemp("sd") / "diffusers_lora"
    _pipeline_class().save_lora_weights(
        folder, unet_lora_layers=get_peft_model_state_dict(lora_unet),
        text_encoder_lora_layers=get_peft_model_state_dict(lora_text),
        unet_lora_adapter_metadata=unet_config.to_dict(), text_encoder_lora_adapter_metadata=text_config.to_dict(),
    )
    deltas = {**peft_deltas(lora_unet, "unet"), **peft_deltas(lora_text, "text_encoder")}
    return {"unet": unet, "text": text, "lora_unet": lora_unet, "lora_text": lora_text, "folder": folder,
            "deltas": deltas}


def forward(unet, text) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 8, 8, generator=generator)
    context = torch.randn(1, 5, 16, generator=generator)
    ids = torch.randint(0, 50, (1, 6), generator=generator)
    with torch.no_grad():
        return unet(sample, 3, context).sample, text(ids).last_hidden_state


def loaded_forward(sd, folder: Path, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    pipe = _pipeline_class()(copy.deepcopy(sd["unet"]), copy.deepcopy(sd["text"]))
    pipe.load_lora_weights(str(folder), **kwargs)
    return forward(pipe.unet, pipe.text_encoder)


def assert_same_deltas(adapter, deltas: dict[str, torch.Tensor], *, tol: float = 1e-6) -> None:
    assert set(adapter.modules) == set(deltas)
    for name, expected in deltas.items():
        got = adapter.delta(name)
        assert got.shape == expected.shape, name
        assert torch.allclose(got, expected, atol=tol, rtol=1e-5), name


def test_a_diffusers_file_reads_into_peft_deltas_with_its_metadata_scales(sd) -> None:
    adapter = load_adapter(sd["folder"])
    assert all(name.startswith(("unet.", "text_encoder.")) for name in adapter.modules)
    assert adapter.modules["unet.down_blocks.0.resnets.0.conv1"].kind == "conv"
    scales = {spec.scale for name, spec in adapter.modules.items() if name.startswith("text_encoder.")}
    assert scales == {1.5}  # alpha 3 / r 2, from lora_adapter_metadata
    assert_same_deltas(adapter, sd["deltas"])
    # The config says which layout was read, and the largest rank as r (alpha = r: the scales are per module).
    assert (adapter.config.raw, adapter.config.r, adapter.config.lora_alpha) == ({"layout": "diffusers"}, 4, 4.0)


@pytest.mark.parametrize("to", ["diffusers", "kohya"])
def test_converted_outputs_load_in_diffusers_with_the_forward_of_base_plus_delta(sd, tmp_path, to) -> None:
    out = tmp_path / ("lora.safetensors" if to == "kohya" else "lora")
    convert(sd["folder"], to=to, out=out)
    expected = forward(sd["lora_unet"], sd["lora_text"])
    got = loaded_forward(sd, out.parent, weight_name=out.name) if to == "kohya" else loaded_forward(sd, out)
    base = forward(sd["unet"], sd["text"])
    for g, e, b in zip(got, expected, base):
        assert (e - b).abs().max() > 1e-3  # the LoRA changes the output, so the check below has teeth
        assert torch.allclose(g, e, atol=1e-5, rtol=1e-5)
    with safe_open(str(out if to == "kohya" else out / "pytorch_lora_weights.safetensors"), "pt") as file:
        assert json.loads(file.metadata()["lora_fusion"])["method"] == "copy"  # provenance in every format


def test_round_trip_peft_kohya_diffusers_peft_keeps_every_delta(sd, tmp_path) -> None:
    peft_dir = convert(sd["folder"], to="peft", out=tmp_path / "peft")
    kohya = convert(peft_dir, to="kohya", out=tmp_path / "k.safetensors")
    back = convert(kohya, to="diffusers", out=tmp_path / "diffusers")
    final = convert(back, to="peft", out=tmp_path / "peft2")
    assert json.loads((final / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert_same_deltas(load_adapter(final), sd["deltas"])
    keys = load_file(kohya)
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in keys)  # SD 1.x: `lora_te_`, one text encoder
    assert all(float(keys[k]) == keys[k.replace(".alpha", ".lora_down.weight")].shape[0]
               for k in keys if k.endswith(".alpha"))  # alpha = rank: scales folded into the factors


def test_convert_passes_the_factors_through_and_peft_and_diffusers_apply_each_modules_recorded_scale(sd, tmp_path):
    """A kohya file whose modules have three different alpha/rank scales, converted to PEFT and diffusers: the
    factors' bytes are written unchanged, each module's alpha goes into the config (`alpha_pattern`, keyed by the
    regex-escaped module name; diffusers' `lora_adapter_metadata`), and PEFT's `PeftModel.from_pretrained` and
    diffusers' `load_lora_weights` both give the forward of base + ΔW."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
    from peft import PeftModel, get_peft_model_state_dict

    state = {f"unet.{k}": v for k, v in get_peft_model_state_dict(sd["lora_unet"]).items()}
    state.update({f"text_encoder.{k}": v for k, v in get_peft_model_state_dict(sd["lora_text"]).items()})
    kohya = convert_state_dict_to_kohya(state)
    for index, key in enumerate(sorted(k for k in kohya if k.endswith(".alpha"))):
        module = key.removesuffix(".alpha")
        rank = kohya[f"{module}.lora_down.weight"].shape[0]
        alpha = rank * (0.5, 1.25, 3.0)[index % 3]
        trained = 8 / 4 if module.startswith("lora_unet_") else 3 / 2  # the fixture's alpha / r
        kohya[key] = torch.tensor(alpha)
        kohya[f"{module}.lora_up.weight"] = kohya[f"{module}.lora_up.weight"] * (trained * rank / alpha)
    source = tmp_path / "alphas.safetensors"
    save_file(kohya, source)
    expected = forward(sd["lora_unet"], sd["lora_text"])

    peft_dir = convert(source, to="peft", out=tmp_path / "peft")
    config = json.loads((peft_dir / "adapter_config.json").read_text())
    assert len({config["lora_alpha"], *config["alpha_pattern"].values()}) > 3  # several alphas, several ranks
    assert all(re.escape(re.sub(r"\\(.)", r"\1", key)) == key for key in config["alpha_pattern"])
    written = load_file(peft_dir / "adapter_model.safetensors")
    for name, spec in load_adapter(source).modules.items():  # no arithmetic: the file's own bytes
        assert torch.equal(written[f"base_model.model.{name}.lora_A.weight"], kohya[spec.a_key]), name
        assert torch.equal(written[f"base_model.model.{name}.lora_B.weight"], kohya[spec.b_key]), name
    container = torch.nn.Module()
    container.unet, container.text_encoder = copy.deepcopy(sd["unet"]), copy.deepcopy(sd["text"])
    model = PeftModel.from_pretrained(container, str(peft_dir))
    by_peft = forward(model.base_model.model.unet, model.base_model.model.text_encoder)
    by_diffusers = loaded_forward(sd, convert(source, to="diffusers", out=tmp_path / "diffusers"))
    base = forward(sd["unet"], sd["text"])
    for got_peft, got_diffusers, e, b in zip(by_peft, by_diffusers, expected, base):
        assert (e - b).abs().max() > 1e-3
        assert torch.allclose(got_peft, e, atol=1e-5, rtol=1e-5)
        assert torch.allclose(got_diffusers, e, atol=1e-5, rtol=1e-5)
    kohya_out = load_file(convert(source, to="kohya", out=tmp_path / "k.safetensors"))
    assert all(float(kohya_out[k]) == kohya_out[k.replace(".alpha", ".lora_down.weight")].shape[0]
               for k in kohya_out if k.endswith(".alpha"))  # kohya output: alpha = rank, scales folded


def test_kohya_written_by_diffusers_reads_with_its_alphas(sd, tmp_path) -> None:
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
    from peft import get_peft_model_state_dict

    state = {f"unet.{k}": v for k, v in get_peft_model_state_dict(sd["lora_unet"]).items()}
    state.update({f"text_encoder.{k}": v for k, v in get_peft_model_state_dict(sd["lora_text"]).items()})
    kohya = convert_state_dict_to_kohya(state)
    # diffusers writes alpha = rank; the LoRA was trained with alpha 8 (unet) and 3 (text), so say so.
    for key in [k for k in kohya if k.endswith(".alpha")]:
        kohya[key] = torch.tensor(8.0 if key.startswith("lora_unet_") else 3.0)
    save_file(kohya, tmp_path / "by_diffusers.safetensors")
    adapter = load_adapter(tmp_path / "by_diffusers.safetensors")
    assert_same_deltas(adapter, sd["deltas"])
    assert (adapter.config.raw, adapter.config.r, adapter.config.lora_alpha) == ({"layout": "kohya"}, 4, 4.0)


def sgm_name(canonical: str) -> str | None:
    """The kohya SGM name (SDXL's original UNet numbering) of a diffusers UNet attention module: an independent map
    (layers_per_block 2: input block 1 + 3·block + layer, output block 3·block + layer, middle block 1)."""
    down = re.match(r"unet\.down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)$", canonical)
    up = re.match(r"unet\.up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)$", canonical)
    mid = re.match(r"unet\.mid_block\.attentions\.0\.(.+)$", canonical)
    if down:
        block, rest = f"input_blocks_{1 + 3 * int(down[1]) + int(down[2])}_1", down[3]
    elif up:
        block, rest = f"output_blocks_{3 * int(up[1]) + int(up[2])}_1", up[3]
    elif mid:
        block, rest = "middle_block_1", mid[1]
    else:
        return None
    return f"lora_unet_{block}_{rest.replace('.', '_')}"


def sgm_kohya_file(deltas: dict[str, torch.Tensor], path: Path) -> Path:
    """A kohya SDXL-style file of `deltas`: the UNet in SGM block names, the text encoders `lora_te1_`/`lora_te2_`;
    each module an exact rank-r factorisation of its ΔW with alpha = 2r (the reader must apply alpha / r = 2)."""
    tensors: dict[str, torch.Tensor] = {}
    for name, delta in deltas.items():
        if name.startswith("unet."):
            kohya = sgm_name(name)
        else:
            component, _, inner = name.partition(".")
            kohya = ("lora_te1_" if component == "text_encoder" else "lora_te2_") + inner.replace(".", "_")
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        r = int((s > 1e-6 * s[0]).sum())
        tensors[f"{kohya}.lora_up.weight"] = (u[:, :r] * s[:r]).contiguous() / 2
        tensors[f"{kohya}.lora_down.weight"] = vh[:r].contiguous()
        tensors[f"{kohya}.alpha"] = torch.tensor(2.0 * r)
    save_file(tensors, path)
    return path


def sgm_deltas(sd) -> dict[str, torch.Tensor]:
    # proj_in is a 1×1 conv in this SD-style UNet (a linear layer in SDXL's): left out of the SGM-named files.
    return {k: v for k, v in sd["deltas"].items()
            if (sgm_name(k) and not k.endswith("proj_in")) or k.startswith("text_encoder.")}


def test_sdxl_kohya_with_sgm_block_names_and_two_text_encoders(sd, tmp_path) -> None:
    """kohya SDXL files name the UNet in SGM blocks and the text encoders `lora_te1_`/`lora_te2_`."""
    text2 = tiny_text_encoder(seed=5)
    lora_text2, _ = with_lora(text2, TEXT_TARGETS, r=3, alpha=3, seed=6)
    deltas = {**sgm_deltas(sd), **peft_deltas(lora_text2, "text_encoder_2")}
    adapter = load_adapter(sgm_kohya_file(deltas, tmp_path / "sdxl.safetensors"))
    assert_same_deltas(adapter, deltas, tol=1e-5)
    written = convert(adapter, to="kohya", out=tmp_path / "out.safetensors")
    assert {k.split("_")[1] for k in load_file(written)} >= {"unet", "te1", "te2"}
    assert_same_deltas(load_adapter(written), deltas, tol=1e-5)
    # diffusers' SDXL loader (with the UNet's own config) puts the SGM file and ours on the same weights.
    for file in (tmp_path / "sdxl.safetensors", written):
        assert_same_deltas_in_diffusers(sd, text2, file, deltas)


def tiny_sdxl_unet():
    """An SDXL-style UNet: no attention in the first down block, linear proj_in/proj_out, two transformer blocks per
    attention in the second, the pooled text embedding and time ids added to the time embedding (`text_time`),
    cross-attention over both text encoders' hidden states (16 + 16)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=(2, 4), use_linear_projection=True,
        transformer_layers_per_block=(1, 2), addition_embed_type="text_time", addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=4 * 6 + 16, norm_num_groups=4,
    ).eval()


def test_an_sdxl_style_unet_lora_in_sgm_names_loads_in_diffusers_with_the_forward_of_base_plus_delta(tmp_path):
    """A LoRA made with PEFT on an SDXL-style UNet and two text encoders, as a kohya file in SGM block names:
    read to PEFT's own ΔW, and the kohya and diffusers outputs loaded by diffusers' SDXL loader give the forward
    of base + ΔW (UNet with its added conditions, both text encoders; float32, 1e-5)."""
    models = {"unet": tiny_sdxl_unet(), "text_encoder": tiny_text_encoder(seed=1),
              "text_encoder_2": tiny_text_encoder(seed=2)}
    unet_targets = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
    deltas = {}
    for (component, model), seed in zip(models.items(), (3, 4, 5)):
        lora, _ = with_lora(model, unet_targets if component == "unet" else TEXT_TARGETS, r=3, alpha=6, seed=seed)
        deltas.update(peft_deltas(lora, component))
    assert all(sgm_name(name) for name in deltas if name.startswith("unet."))  # every UNet LoRA is in an attention
    source = sgm_kohya_file(deltas, tmp_path / "sdxl.safetensors")
    assert_same_deltas(load_adapter(source), deltas, tol=1e-5)

    def forward(unet, text, text2) -> list[torch.Tensor]:
        generator = torch.Generator().manual_seed(0)
        sample, context = torch.randn(1, 4, 8, 8, generator=generator), torch.randn(1, 5, 32, generator=generator)
        conditions = {"text_embeds": torch.randn(1, 16, generator=generator),
                      "time_ids": torch.rand(1, 6, generator=generator) * 8}
        ids = torch.randint(0, 50, (1, 6), generator=generator)
        with torch.no_grad():
            return [unet(sample, 3, context, added_cond_kwargs=conditions).sample, text(ids).last_hidden_state,
                    text2(ids).last_hidden_state]

    expected_models = {component: copy.deepcopy(model) for component, model in models.items()}
    with torch.no_grad():
        for name, delta in deltas.items():
            component, _, path = name.partition(".")
            weight = expected_models[component].get_submodule(path).weight
            weight += delta.reshape(weight.shape)
    expected, base = forward(*expected_models.values()), forward(*models.values())
    assert all((e - b).abs().max() > 1e-3 for e, b in zip(expected, base))  # the LoRA changes every output
    for out in (convert(source, to="kohya", out=tmp_path / "out.safetensors"),
                convert(source, to="diffusers", out=tmp_path / "diffusers") / "pytorch_lora_weights.safetensors"):
        pipe = _sdxl_pipeline_class()(*(copy.deepcopy(m) for m in models.values()))
        pipe.load_lora_weights(str(out.parent), weight_name=out.name)
        got = forward(pipe.unet, pipe.text_encoder, pipe.text_encoder_2)
        for g, e in zip(got, expected):
            assert torch.allclose(g, e, atol=1e-5), (out.name, (g - e).abs().max())


def kohya_modules(file: Path) -> set[str]:
    return {key.split(".", 1)[0] for key in load_file(file)}


def test_kohya_output_keeps_the_kohya_names_its_sources_agree_on(sd, tmp_path) -> None:
    """kohya → kohya keeps the SGM block names kohya's SDXL trainer writes; a merge keeps its sources' names where
    they agree, and where they do not every module takes diffusers' names (diffusers' reader drops the SGM-named
    modules of a file that mixes the two)."""
    deltas = sgm_deltas(sd)
    source = sgm_kohya_file(deltas, tmp_path / "sgm.safetensors")
    assert any("input_blocks" in name for name in kohya_modules(source))
    written = convert(source, to="kohya", out=tmp_path / "same.safetensors")
    assert kohya_modules(written) == kohya_modules(source)
    assert_same_deltas(load_adapter(written), deltas, tol=1e-5)
    agreeing = merge([source, written], method="linear", weights=[0.5, 0.5])
    kept = agreeing.save_pretrained(tmp_path / "agreeing.safetensors", format="kohya")
    assert kohya_modules(kept) == kohya_modules(source)
    assert_same_deltas(load_adapter(kept), deltas, tol=1e-5)

    diffusers_named = convert(sd["folder"], to="kohya", out=tmp_path / "diffusers_named.safetensors")
    assert not any(block in name for name in kohya_modules(diffusers_named)
                   for block in ("input_blocks", "middle_block", "output_blocks"))
    mixed = merge([source, diffusers_named], method="linear", weights=[1.0, 1.0])
    out = mixed.save_pretrained(tmp_path / "mixed.safetensors", format="kohya")
    assert kohya_modules(out) == kohya_modules(diffusers_named)
    expected = {name: delta + deltas.get(name, torch.zeros_like(delta)) for name, delta in sd["deltas"].items()}
    assert_same_deltas(load_adapter(out), expected, tol=1e-5)


def test_kohya_output_folds_a_scale_of_one_half_into_the_smaller_factor(tmp_path) -> None:
    """alpha = rank/2 (scale ½) is exact on either factor: the one with fewer values takes it, the other is written
    as the file holds it; B when they are as large."""
    tensors, rank = {}, 4
    generator = torch.Generator().manual_seed(0)
    for part, (out, into) in {"mlp_fc1": (64, 16), "mlp_fc2": (16, 64), "self_attn_q_proj": (16, 16)}.items():
        name = f"lora_te_text_model_encoder_layers_0_{part}"
        tensors[f"{name}.lora_down.weight"] = torch.randn(rank, into, generator=generator).half()
        tensors[f"{name}.lora_up.weight"] = torch.randn(out, rank, generator=generator).half()
        tensors[f"{name}.alpha"] = torch.tensor(rank / 2)
    save_file(tensors, tmp_path / "half.safetensors")
    written = load_file(convert(tmp_path / "half.safetensors", to="kohya", out=tmp_path / "out.safetensors"))
    fc1, fc2, q = (f"lora_te_text_model_encoder_layers_0_{part}" for part in ("mlp_fc1", "mlp_fc2", "self_attn_q_proj"))
    for smaller, larger in ((f"{fc1}.lora_down.weight", f"{fc1}.lora_up.weight"),
                            (f"{fc2}.lora_up.weight", f"{fc2}.lora_down.weight"),
                            (f"{q}.lora_up.weight", f"{q}.lora_down.weight")):
        assert torch.equal(written[larger], tensors[larger]), larger
        assert torch.equal(written[smaller], tensors[smaller] * 0.5), smaller
    assert float(written[f"{fc1}.alpha"]) == float(written[f"{fc2}.alpha"]) == rank


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_a_folded_factor_has_the_bits_torch_gives_for_the_number(dtype) -> None:
    """The fold multiplies by a 0-dim tensor of the factor's dtype where that dtype holds the factor exactly (twice as
    fast for float16), else by the number; either way every product has the bits of `tensor * factor`: checked
    over every finite float16 and bfloat16 value (a float32 sample spanning its exponents), for exact and inexact,
    negative and zero factors, and after a first call in inference mode (the multiplier is shared)."""
    from lora_fusion.formats.peft import _held_exactly, _times

    _held_exactly.cache_clear()
    with torch.inference_mode():
        _times(torch.ones(2, dtype=dtype), 0.5)
    if dtype == torch.float32:
        generator = torch.Generator().manual_seed(0)
        values = torch.randn(200_000, generator=generator) * torch.exp2(torch.randint(-140, 120, (200_000,),
                                                                                      generator=generator).float())
    else:
        values = torch.arange(-(2 ** 15), 2 ** 15, dtype=torch.int32).to(torch.int16).view(dtype)
    values = values[torch.isfinite(values)]
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    for factor in (0.5, 2.0, -0.25, 2.0 ** -20, 0.75, 0.3, -1 / 3, 1e-30, 0.0, -0.0):
        assert torch.equal(_times(values, factor).view(bits), (values * factor).view(bits)), factor
    assert _held_exactly(0.5, dtype) is not None and _held_exactly(0.5, dtype).dtype == dtype
    assert _held_exactly(0.3, torch.float16) is None
    grad = torch.ones(3, dtype=dtype, requires_grad=True)
    _times(grad, 0.5).sum().backward()  # a shared multiplier made in inference mode would refuse this
    assert torch.equal(grad.grad, torch.full((3,), 0.5, dtype=dtype))


@pytest.mark.parametrize("shape", [(), (1,)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_a_kohya_alpha_of_any_float_dtype_and_one_element_gives_its_scale(tmp_path, dtype, shape) -> None:
    name = "lora_te_text_model_encoder_layers_0_mlp_fc1"
    path = tmp_path / "alpha.safetensors"
    save_file({f"{name}.lora_down.weight": torch.ones(4, 16), f"{name}.lora_up.weight": torch.ones(64, 4),
               f"{name}.alpha": torch.full(shape, 3.0, dtype=dtype)}, path)
    assert load_adapter(path).modules["text_encoder.text_model.encoder.layers.0.mlp.fc1"].scale == 0.75


def assert_same_deltas_in_diffusers(sd, text2, file: Path, deltas: dict[str, torch.Tensor]) -> None:
    models = {"unet": sd["unet"], "text_encoder": sd["text"], "text_encoder_2": text2}
    pipe = _sdxl_pipeline_class()(*(copy.deepcopy(m) for m in models.values()))
    pipe.load_lora_weights(str(file.parent), weight_name=file.name)
    pipe.fuse_lora(components=list(models))
    for name, delta in deltas.items():
        component, _, path = name.partition(".")
        fused = getattr(pipe, component).get_submodule(path)
        base = models[component].get_submodule(path)
        assert torch.allclose((fused.weight - base.weight).flatten(1).float(), delta, atol=1e-5), name


def test_kohya_and_diffusers_sources_merge_by_canonical_name(sd, tmp_path) -> None:
    kohya = convert(sd["folder"], to="kohya", out=tmp_path / "a.safetensors")
    other = with_lora(sd["unet"], ["to_q", "conv1"], r=2, alpha=2, seed=9)[0]
    from peft import get_peft_model_state_dict

    folder = tmp_path / "b"
    _pipeline_class().save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(other))
    b_deltas = peft_deltas(other, "unet")
    merged = merge([kohya, folder], method="linear", weights=[0.5, 2.0])
    assert set(merged.modules) == set(sd["deltas"])  # b's modules are a subset: missing = zero update
    for name, delta in sd["deltas"].items():
        expected = 0.5 * delta + 2.0 * b_deltas.get(name, torch.zeros_like(delta))
        assert torch.allclose(merged.delta(name), expected, atol=1e-5), name
    out = merged.save_pretrained(tmp_path / "merged", format="diffusers")
    assert (out / "pytorch_lora_weights.safetensors").is_file() and (out / "README.md").is_file()
    assert "load_lora_weights" in (out / "README.md").read_text()


def test_a_shape_mismatch_across_formats_names_the_module(sd, tmp_path) -> None:
    kohya = convert(sd["folder"], to="kohya", out=tmp_path / "a.safetensors")
    tensors = load_file(kohya)
    key = next(k for k in tensors if "attn1_to_q" in k and k.endswith("lora_down.weight"))
    tensors[key] = torch.randn(tensors[key].shape[0], tensors[key].shape[1] + 1)
    save_file(tensors, tmp_path / "bad.safetensors")
    with pytest.raises(IncompatibleAdaptersError, match="to_q"):
        merge([sd["folder"], tmp_path / "bad.safetensors"])


def flux_model():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                  attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                  pooled_projection_dim=16, axes_dims_rope=(2, 2, 4)).eval()


def test_flux_kohya_fuses_qkv_exactly_and_diffusers_reads_it_back(tmp_path) -> None:
    """Writing kohya Flux fuses q/k/v (a block-diagonal up matrix; k absent here, so zero rows) and diffusers' own
    reader splits it back to the same ΔW per module."""
    from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin

    model = flux_model()
    targets = ["attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
               "ff.net.2", "single_transformer_blocks.0.proj_out"]
    lora, _ = with_lora(model, targets, r=3, alpha=6, seed=4)
    deltas = {k: v for k, v in peft_deltas(lora, "transformer").items()
              if not k.startswith("transformer.single_transformer_blocks.0.attn")}
    from peft import get_peft_model_state_dict

    state = {f"transformer.{k}": v for k, v in get_peft_model_state_dict(lora).items()
             if not k.startswith("single_transformer_blocks.0.attn")}
    save_file(state, tmp_path / "flux_diffusers.safetensors",
              metadata={"lora_adapter_metadata": json.dumps({"transformer.r": 3, "transformer.lora_alpha": 6})})
    adapter = load_adapter(tmp_path / "flux_diffusers.safetensors")
    assert_same_deltas(adapter, deltas)
    written = convert(adapter, to="kohya", out=tmp_path / "flux.safetensors")
    keys = load_file(written)
    qkv = "lora_unet_double_blocks_0_img_attn_qkv"
    assert keys[f"{qkv}.lora_down.weight"].shape[0] == 6  # to_q and to_v fused at rank 3 + 3; to_k absent
    assert keys[f"{qkv}.lora_up.weight"][16:32].abs().max() == 0  # k's rows
    converted = FluxLoraLoaderMixin.lora_state_dict(str(written))
    for name, delta in deltas.items():
        a, b = converted[f"{name}.lora_A.weight"], converted[f"{name}.lora_B.weight"]
        assert torch.allclose(b.float() @ a.float(), delta, atol=1e-5), name
    back = load_adapter(written)
    for name, delta in deltas.items():
        assert torch.allclose(back.delta(name), delta, atol=1e-5), name
    assert back.delta("transformer.transformer_blocks.0.attn.to_k").abs().max() == 0


def flux_forward(model) -> torch.Tensor:
    generator, tokens, text = torch.Generator().manual_seed(1), 4, 3
    with torch.no_grad():
        return model(hidden_states=torch.randn(1, tokens, 4, generator=generator),
                     encoder_hidden_states=torch.randn(1, text, 16, generator=generator),
                     pooled_projections=torch.randn(1, 16, generator=generator), timestep=torch.tensor([0.5]),
                     img_ids=torch.randn(tokens, 3, generator=generator),
                     txt_ids=torch.randn(text, 3, generator=generator)).sample


def test_kohya_flux_top_level_modules_read_under_the_transformer_and_load_with_the_forward_of_base_plus_delta(
    tmp_path,
) -> None:
    """kohya Flux modules outside the blocks (img_in, txt_in, time_in, vector_in, final_layer), which diffusers'
    converter names without `transformer.`, read under it beside block modules (a fused q/k/v among them, split);
    kohya output keeps every kohya name (q/k/v fused again),
    and diffusers output loaded into the Flux model by its loader gives the forward of base + ΔW (float32, 1e-5).
    (diffusers' own reader of the kohya file drops the top-level modules, README: known limits; the block modules of
    the kohya output load there with the forward of base + their ΔW.)"""
    from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin

    model = flux_model()
    modules = {"img_in": "x_embedder", "txt_in": "context_embedder",
               "time_in_in_layer": "time_text_embed.timestep_embedder.linear_1",
               "vector_in_in_layer": "time_text_embed.text_embedder.linear_1", "final_layer_linear": "proj_out",
               "double_blocks_0_img_attn_proj": "transformer_blocks.0.attn.to_out.0",
               "single_blocks_0_linear2": "single_transformer_blocks.0.proj_out"}
    generator, tensors, deltas = torch.Generator().manual_seed(0), {}, {}
    for kohya, name in modules.items():
        out, into = model.get_submodule(name).weight.shape
        down, up = torch.randn(2, into, generator=generator), torch.randn(out, 2, generator=generator)
        tensors.update({f"lora_unet_{kohya}.lora_down.weight": down, f"lora_unet_{kohya}.lora_up.weight": up,
                        f"lora_unet_{kohya}.alpha": torch.tensor(1.0)})
        deltas[f"transformer.{name}"] = 0.5 * up @ down
    # And a fused q/k/v: one down, an up of 3 × 16 rows, split into three modules.
    down, up = torch.randn(2, 16, generator=generator), torch.randn(48, 2, generator=generator)
    qkv = "lora_unet_double_blocks_0_img_attn_qkv"
    tensors.update({f"{qkv}.lora_down.weight": down, f"{qkv}.lora_up.weight": up, f"{qkv}.alpha": torch.tensor(1.0)})
    for index, part in enumerate(("to_q", "to_k", "to_v")):
        deltas[f"transformer.transformer_blocks.0.attn.{part}"] = (0.5 * up @ down)[16 * index:16 * (index + 1)]
    save_file(tensors, tmp_path / "flux.safetensors")
    assert_same_deltas(load_adapter(tmp_path / "flux.safetensors"), deltas)
    kohya_out = convert(tmp_path / "flux.safetensors", to="kohya", out=tmp_path / "out.safetensors")
    assert kohya_modules(kohya_out) == {f"lora_unet_{kohya}" for kohya in modules} | {qkv}
    assert_same_deltas(load_adapter(kohya_out), deltas, tol=1e-5)

    def with_deltas(names) -> torch.nn.Module:
        expected = copy.deepcopy(model)
        with torch.no_grad():
            for name in names:
                expected.get_submodule(name.removeprefix("transformer.")).weight += deltas[name]
        return expected

    state, metadata = FluxLoraLoaderMixin.lora_state_dict(
        str(convert(tmp_path / "flux.safetensors", to="diffusers", out=tmp_path / "diffusers")),
        return_lora_metadata=True)
    loaded = copy.deepcopy(model)
    loaded.load_lora_adapter(state, prefix="transformer", metadata=metadata, adapter_name="lora")
    expected = flux_forward(with_deltas(deltas))
    assert (expected - flux_forward(model)).abs().max() > 0.1  # the LoRA changes the output
    assert torch.allclose(flux_forward(loaded), expected, atol=1e-5)
    blocks = {name for name in deltas if "blocks." in name}
    state = FluxLoraLoaderMixin.lora_state_dict(str(kohya_out))
    loaded = copy.deepcopy(model)
    loaded.load_lora_adapter({k: v for k, v in state.items() if "blocks." in k}, prefix="transformer",
                             adapter_name="lora")
    assert torch.allclose(flux_forward(loaded), flux_forward(with_deltas(blocks)), atol=1e-5)


def test_a_flux_single_block_linear1_is_split_and_fused_again_at_flux_widths(tmp_path) -> None:
    """diffusers' converter splits a single block's fused linear1 by Flux's own widths (q, k, v 3072 rows each, the
    MLP input 12288), so this runs at those widths, on factors alone: a diffusers file with q, v and the MLP input
    (k absent) written as one kohya linear1 of rank 3·2 with zero rows for k, read back to the same updates."""
    generator, width, rank = torch.Generator().manual_seed(0), 3072, 2
    parts = {"attn.to_q": width, "attn.to_v": width, "proj_mlp": 4 * width}
    state, factors = {}, {}
    for part, out in parts.items():
        name = f"transformer.single_transformer_blocks.0.{part}"
        down, up = torch.randn(rank, width, generator=generator), torch.randn(out, rank, generator=generator)
        state[f"{name}.lora_A.weight"], state[f"{name}.lora_B.weight"] = down, up
        factors[name] = (down, up)
    save_file(state, tmp_path / "single.safetensors")
    written = convert(tmp_path / "single.safetensors", to="kohya", out=tmp_path / "single_kohya.safetensors")
    fused = load_file(written)
    down, up = (fused[f"lora_unet_single_blocks_0_linear1.lora_{part}.weight"] for part in ("down", "up"))
    assert down.shape == (3 * rank, width) and up.shape == (7 * width, 3 * rank)
    assert up[width:2 * width].abs().max() == 0  # k's rows
    probe = torch.randn(width, 3, generator=generator)
    back = load_adapter(written)
    for name, (a, b) in factors.items():
        spec, got = back.modules[name], back.factors(name)
        assert torch.allclose(spec.scale * got.B.float() @ (got.A.float() @ probe), b @ (a @ probe), atol=1e-3), name
    assert back.factors("transformer.single_transformer_blocks.0.attn.to_k").B.abs().max() == 0


def test_a_kohya_flux_file_with_clip_l_reads_and_writes_its_text_encoder(tmp_path) -> None:
    """kohya's Flux trainer names CLIP-L's modules `lora_te1_…`: read beside the transformer's, written back under
    that name (from the kohya file, and from a PEFT folder that has no kohya names), and read by diffusers' Flux
    loader."""
    from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin

    generator = torch.Generator().manual_seed(0)
    te, proj = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj", "lora_unet_double_blocks_0_img_attn_proj"
    tensors = {}
    for name, width in ((proj, 16), (te, 32)):
        tensors[f"{name}.lora_down.weight"] = torch.randn(2, width, generator=generator)
        tensors[f"{name}.lora_up.weight"] = torch.randn(width, 2, generator=generator)
        tensors[f"{name}.alpha"] = torch.tensor(1.0)
    source = tmp_path / "flux_clip.safetensors"
    save_file(tensors, source)
    adapter = load_adapter(source)
    clip = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
    assert set(adapter.modules) == {clip, "transformer.transformer_blocks.0.attn.to_out.0"}
    expected = 0.5 * tensors[f"{te}.lora_up.weight"] @ tensors[f"{te}.lora_down.weight"]
    assert torch.allclose(adapter.delta(clip), expected, atol=1e-6)
    peft_dir = convert(adapter, to="peft", out=tmp_path / "peft")
    for origin in (source, peft_dir):
        out = convert(origin, to="kohya", out=tmp_path / f"{origin.stem}_out.safetensors")
        assert kohya_modules(out) == {te, proj}
        assert any(k.startswith("text_encoder.") for k in FluxLoraLoaderMixin.lora_state_dict(str(out)))
        back = load_adapter(out)
        for name in adapter.modules:
            assert torch.allclose(back.delta(name), adapter.delta(name), atol=1e-5), name


def test_comfyui_prefix_reads_like_kohya(tmp_path) -> None:
    tensors = {
        "diffusion_model.double_blocks.0.img_attn.proj.lora_A.weight": torch.randn(2, 16),
        "diffusion_model.double_blocks.0.img_attn.proj.lora_B.weight": torch.randn(16, 2),
        "diffusion_model.double_blocks.0.img_attn.proj.alpha": torch.tensor(1.0),
    }
    save_file(tensors, tmp_path / "comfy.safetensors")
    adapter = load_adapter(tmp_path / "comfy.safetensors")
    name = "transformer.transformer_blocks.0.attn.to_out.0"
    expected = 0.5 * tensors["diffusion_model.double_blocks.0.img_attn.proj.lora_B.weight"] @ \
        tensors["diffusion_model.double_blocks.0.img_attn.proj.lora_A.weight"]
    assert list(adapter.modules) == [name]
    assert torch.allclose(adapter.delta(name), expected, atol=1e-6)


def test_a_comfyui_text_encoder_lora_reads_like_kohya(tmp_path) -> None:
    """ComfyUI names CLIP-L's modules `text_encoders.clip_l.transformer.…` (kohya's `lora_te1_…`)."""
    prefix = "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj"
    tensors = {f"{prefix}.lora_A.weight": torch.randn(2, 16), f"{prefix}.lora_B.weight": torch.randn(16, 2)}
    save_file(tensors, tmp_path / "comfy_te.safetensors")
    adapter = load_adapter(tmp_path / "comfy_te.safetensors")
    name = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
    assert list(adapter.modules) == [name]
    expected = tensors[f"{prefix}.lora_B.weight"] @ tensors[f"{prefix}.lora_A.weight"]
    assert torch.allclose(adapter.delta(name), expected, atol=1e-6)


def test_lycoris_loha_and_lokr_in_a_kohya_file_match_lycoris(sd, tmp_path) -> None:
    from lycoris.modules.loha import LohaModule
    from lycoris.modules.lokr import LokrModule

    unet = sd["unet"]
    to_q = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    conv = unet.down_blocks[0].resnets[0].conv1
    conv2 = unet.down_blocks[0].resnets[1].conv2
    torch.manual_seed(3)
    loha = LohaModule("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", to_q,
                      lora_dim=2, alpha=1)
    lokr = LokrModule("lora_unet_down_blocks_0_resnets_0_conv1", conv, lora_dim=2, alpha=1, factor=2)
    # LoHa on a 3×3 conv stores its factors flattened ([r, in·3·3]): the kernel comes from the UNet's layout.
    flat = LohaModule("lora_unet_down_blocks_0_resnets_1_conv2", conv2, lora_dim=2, alpha=4)
    tensors = {}
    expected = {}
    for canonical, module, base in (("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", loha, to_q),
                                    ("unet.down_blocks.0.resnets.0.conv1", lokr, conv),
                                    ("unet.down_blocks.0.resnets.1.conv2", flat, conv2)):
        for p in module.parameters():
            if p.abs().max() == 0:
                torch.nn.init.normal_(p, std=0.3)
        expected[canonical] = module.get_weight(base.weight.shape).flatten(1).float().detach()
        tensors.update({f"{module.lora_name}.{k}": v.detach().contiguous() for k, v in module.state_dict().items()})
    save_file(tensors, tmp_path / "lycoris.safetensors")
    adapter = load_adapter(tmp_path / "lycoris.safetensors")
    for conv_name in ("unet.down_blocks.0.resnets.0.conv1", "unet.down_blocks.0.resnets.1.conv2"):
        assert adapter.modules[conv_name].kind == "conv" and adapter.modules[conv_name].kernel == (3, 3)
    assert "hada_w1_b" in " ".join(tensors) and tensors[f"{flat.lora_name}.hada_w1_b"].dim() == 2
    assert_same_deltas(adapter, expected, tol=1e-5)
    out = convert(adapter, to="diffusers", out=tmp_path / "plain")  # exact plain LoRA, loads in diffusers
    assert_same_deltas(load_adapter(out), expected, tol=1e-5)


def test_hub_repo_with_a_kohya_file_and_weight_name(hub, tmp_path, sd) -> None:
    kohya = convert(sd["folder"], to="kohya", out=tmp_path / "style.safetensors")
    hub.add_repo("org/style", {"style.safetensors": kohya.read_bytes(), "README.md": b"# style"})
    assert_same_deltas(load_adapter("org/style"), sd["deltas"])
    hub.add_repo("org/two", {"a.safetensors": kohya.read_bytes(), "b.safetensors": kohya.read_bytes()})
    with pytest.raises(AmbiguousSourceError, match="--weight-name"):
        load_adapter("org/two")
    assert_user_error(invoke("convert", "org/two", "--to", "peft", "--out", str(tmp_path / "never")),
                      "org/two holds 2 LoRA files (a.safetensors, b.safetensors)", "--weight-name")
    with pytest.raises(AmbiguousSourceError, match=r"^org/two holds 2 LoRA files"):
        load_adapter("org/two", input_format="kohya")
    assert not (tmp_path / "never").exists()
    assert_same_deltas(load_adapter("org/two", weight_name="b.safetensors"), sd["deltas"])
    # A full model's weights file beside the LoRA is no candidate, with or without --input-format.
    save_file({"model.embed.weight": torch.zeros(4, 4)}, tmp_path / "model.safetensors")
    hub.add_repo("org/with-model", {"style.safetensors": kohya.read_bytes(),
                                    "model.safetensors": (tmp_path / "model.safetensors").read_bytes()})
    for input_format in (None, "kohya"):
        assert_same_deltas(load_adapter("org/with-model", input_format=input_format), sd["deltas"])


def test_input_format_reads_the_format_named_where_detection_would_read_another(sd, tmp_path) -> None:
    """A folder holding a PEFT adapter and a diffusers file reads as PEFT, and as the diffusers file with
    --input-format diffusers; --input-format kohya takes a folder's one kohya file, and names a stray tensor that
    keeps detection from recognising the file; an unknown format is refused with the choices (exit 2)."""
    from peft import get_peft_model_state_dict

    both = convert(sd["folder"], to="peft", out=tmp_path / "both")
    other = with_lora(sd["unet"], ["to_q", "conv1"], r=2, alpha=2, seed=9)[0]
    _pipeline_class().save_lora_weights(tmp_path / "other", unet_lora_layers=get_peft_model_state_dict(other))
    (both / "pytorch_lora_weights.safetensors").write_bytes(
        (tmp_path / "other" / "pytorch_lora_weights.safetensors").read_bytes())
    assert_same_deltas(load_adapter(both), sd["deltas"])
    assert_same_deltas(load_adapter(both, input_format="diffusers"), peft_deltas(other, "unet"))
    out = tmp_path / "other.safetensors"
    result = invoke("convert", str(both), "--input-format", "diffusers", "--to", "kohya", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert_same_deltas(load_adapter(out), peft_deltas(other, "unet"), tol=1e-5)

    folder = tmp_path / "kohya_folder"
    folder.mkdir()
    kohya = convert(sd["folder"], to="kohya", out=folder / "style.safetensors")
    assert_same_deltas(load_adapter(folder, input_format="kohya"), sd["deltas"])
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))  # makes it look PEFT's
    assert_same_deltas(load_adapter(folder, input_format="kohya"), sd["deltas"])
    save_file({**load_file(kohya), "stray.weight": torch.ones(2)}, tmp_path / "stray.safetensors")
    with pytest.raises(NotALoraAdapterError, match="--input-format"):
        load_adapter(tmp_path / "stray.safetensors")
    result = invoke("convert", str(tmp_path / "stray.safetensors"), "--input-format", "kohya", "--to", "peft",
                    "--out", str(tmp_path / "never"))
    assert_user_error(result, "module stray")
    assert_user_error(invoke("convert", str(kohya), "--input-format", "onnx", "--to", "peft", "--out",
                             str(tmp_path / "never")), "peft, diffusers, kohya")
    assert not (tmp_path / "never").exists()


def test_peft_merges_and_converts_never_import_diffusers_and_a_missing_diffusers_is_named(tmp_path, monkeypatch):
    """diffusers (and the peft and transformers it imports, seconds) is imported only for a diffusion file: a fresh
    process that merges two PEFT adapters and converts one to a PEFT folder never imports it. Where it is not
    installed, a kohya file is refused (exit 2) with the command that installs it."""
    from tests.test_properties import write_lora

    shapes = {"model.layers.0.self_attn.q_proj": (16, 12)}
    a, b = (write_lora(tmp_path / name, shapes, r=4, alpha=8, seed=seed) for seed, name in enumerate("ab"))
    code = (
        "import sys; from lora_fusion import convert, merge; "
        f"merge([{str(a)!r}, {str(b)!r}], method='svd', rank=4).save_pretrained({str(tmp_path / 'm')!r}); "
        f"convert({str(a)!r}, to='peft', out={str(tmp_path / 'c')!r}); "
        "loaded = [m for m in ('diffusers', 'peft', 'transformers') if m in sys.modules]; "
        "assert not loaded, loaded"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert (tmp_path / "m" / "adapter_model.safetensors").is_file() and (tmp_path / "c").is_dir()

    from lora_fusion.formats import keymaps

    name = "lora_te_text_model_encoder_layers_0_mlp_fc1"
    save_file({f"{name}.lora_down.weight": torch.ones(2, 16), f"{name}.lora_up.weight": torch.ones(64, 2)},
              tmp_path / "k.safetensors")
    monkeypatch.setattr(keymaps, "diffusers_available", lambda: False)
    with pytest.raises(UnsupportedAdapterError, match=re.escape('pip install "lora-fusion[diffusers]"')):
        load_adapter(tmp_path / "k.safetensors")
    result = invoke("convert", str(tmp_path / "k.safetensors"), "--to", "peft", "--out", str(tmp_path / "never"))
    assert_user_error(result, "lora-fusion[diffusers]")
    assert not (tmp_path / "never").exists()


def test_a_hub_lora_file_is_read_at_its_revision_in_its_subfolder_with_the_token(hub, tmp_path, sd) -> None:
    """A private repo whose branch `v2` holds the kohya file in `loras/`, beside a full model's weights file; `main`
    (under another name) and the repo's root hold another LoRA. Found by detection and with --input-format kohya
    alike; a repo with no LoRA file is refused naming the file looked for."""
    from lora_fusion.errors import SourceNotFoundError

    kohya = convert(sd["folder"], to="kohya", out=tmp_path / "style.safetensors")
    doubled = {k: v * 2 if k.endswith("lora_up.weight") else v for k, v in load_file(kohya).items()}
    save_file(doubled, tmp_path / "other.safetensors")
    other, token = (tmp_path / "other.safetensors").read_bytes(), "hf_fake_secret_token_0123456789"
    save_file({"model.embed.weight": torch.zeros(4, 4)}, tmp_path / "model.safetensors")
    hub.required_token = token
    hub.add_repo("org/private-style", {"loras/old_style.safetensors": other}, private=True)
    hub.add_repo("org/private-style", {"loras/style.safetensors": kohya.read_bytes(), "top.safetensors": other,
                                       "loras/model.safetensors": (tmp_path / "model.safetensors").read_bytes()},
                 private=True, branch="v2")
    for input_format in (None, "kohya"):
        adapter = load_adapter("org/private-style", revision="v2", subfolder="loras", token=token,
                               input_format=input_format)
        assert_same_deltas(adapter, sd["deltas"])
        with pytest.raises(SourceNotFoundError, match="private"):
            load_adapter("org/private-style", revision="v2", subfolder="loras", input_format=input_format)
    hub.add_repo("org/card-only", {"README.md": b"# nothing yet"})
    with pytest.raises(SourceNotFoundError, match="no file pytorch_lora_weights.safetensors"):
        load_adapter("org/card-only", input_format="kohya")


def test_a_local_folder_with_several_lora_files_takes_the_one_named(sd, tmp_path) -> None:
    from lora_fusion.errors import SourceNotFoundError

    folder = tmp_path / "loras"
    folder.mkdir()
    kohya = convert(sd["folder"], to="kohya", out=folder / "b.safetensors")
    doubled = {k: v * 2 if k.endswith("lora_up.weight") else v for k, v in load_file(kohya).items()}
    save_file(doubled, folder / "a.safetensors")
    with pytest.raises(AmbiguousSourceError, match=f"^{re.escape(str(folder))} holds 2 LoRA files"):
        load_adapter(folder)
    assert_same_deltas(load_adapter(folder, weight_name="b.safetensors"), sd["deltas"])
    with pytest.raises(SourceNotFoundError, match="no file c.safetensors in"):
        load_adapter(folder, weight_name="c.safetensors")


def test_cli_convert_and_merge_format(sd, tmp_path) -> None:
    out = tmp_path / "k.safetensors"
    result = invoke(*["convert", str(sd["folder"]), "--to", "kohya", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert_user_error(invoke(*["convert", str(sd["folder"]), "--to", "kohya", "--out", str(out)]), "--overwrite")
    assert invoke(*["convert", str(sd["folder"]), "--to", "kohya", "--out", str(out), "--overwrite"]).exit_code == 0
    merged = tmp_path / "m"
    result = invoke(*["merge", str(out), str(sd["folder"]), "--method", "svd", "--rank", "4", "--format", "diffusers",
                     "--out", str(merged)])
    assert result.exit_code == 0, result.output
    assert (merged / "pytorch_lora_weights.safetensors").is_file()
    assert_user_error(invoke(*["merge", str(out), "--format", "kohya", "--out", str(tmp_path / "x")]), ".safetensors")
    assert_user_error(invoke(*["convert", str(sd["folder"]), "--to", "onnx", "--out", str(tmp_path / "y")]),
                      "peft, diffusers, kohya")


@pytest.mark.parametrize("to", ["kohya", "diffusers"])
def test_a_disk_full_in_the_middle_of_a_write_leaves_the_previous_output_intact(sd, tmp_path, monkeypatch, to):
    from lora_fusion.formats import stores

    out = tmp_path / ("out.safetensors" if to == "kohya" else "out")
    convert(sd["folder"], to=to, out=out)

    def contents() -> dict[str, bytes]:
        return {out.name: out.read_bytes()} if out.is_file() else {p.name: p.read_bytes() for p in out.iterdir()}

    before, written, write = contents(), [], stores.write_tensor_bytes

    def full_after_three(file, tensor) -> None:
        written.append(tensor.shape)
        if len(written) > 3:
            raise OSError(28, "No space left on device")
        write(file, tensor)

    monkeypatch.setattr(stores, "write_tensor_bytes", full_after_three)
    result = invoke("convert", str(sd["folder"]), "--to", to, "--out", str(out), "--overwrite")
    assert_user_error(result, "No space left", "nothing was written")
    assert len(written) == 4 and contents() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_an_input_kohya_file_is_never_overwritten(sd, tmp_path) -> None:
    kohya = convert(sd["folder"], to="kohya", out=tmp_path / "k.safetensors")
    user_file = tmp_path / "mine.safetensors"
    with pytest.raises(OutputProtectedError, match="input"):
        convert(kohya, to="kohya", out=kohya, overwrite=True)
    save_file({"x": torch.zeros(1)}, user_file)
    with pytest.raises(OutputProtectedError, match="did not write"):
        convert(sd["folder"], to="kohya", out=user_file, overwrite=True)


def test_a_module_the_target_format_cannot_hold_is_refused_by_name(tmp_path) -> None:
    from tests.test_reliability import lora

    source = lora(tmp_path / "llama")
    with pytest.raises(UnsupportedAdapterError, match=r"module model\.layers\.0\.self_attn\.q_proj"):
        convert(source, to="kohya", out=tmp_path / "x.safetensors")
    with pytest.raises(UnsupportedAdapterError, match=r"module model\.layers\.0\.self_attn\.q_proj .*pipeline"):
        convert(source, to="diffusers", out=tmp_path / "d")
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "d").exists()


@pytest.mark.parametrize(
    ("tensors", "error", "message"),
    [
        ({"foo.weight": torch.zeros(2, 2), "bar.bias": torch.zeros(2)}, NotALoraAdapterError, "foo.weight"),
        ({"lora_unet_x.lora_down.weight": torch.zeros(2, 4), "lora_unet_x.lora_up.weight": torch.zeros(4, 3)},
         CorruptAdapterError, "lora_unet_x"),
        ({"lora_unet_x.lora_down.weight": torch.zeros(2, 4), "lora_unet_x.lora_up.weight": torch.zeros(4, 2),
          "lora_unet_x.alpha": torch.tensor(float("nan"))}, CorruptAdapterError, "lora_unet_x.*alpha"),
        ({"lora_unet_x.lora_down.weight": torch.zeros(2, 4), "lora_unet_x.lora_up.weight": torch.zeros(4, 2),
          "lora_unet_x.alpha": torch.zeros(2)}, CorruptAdapterError, "lora_unet_x.*alpha"),
        ({"lora_unet_x.hada_w1_a": torch.zeros(4, 2), "lora_unet_x.hada_w1_b": torch.zeros(2, 4),
          "lora_unet_x.hada_w2_a": torch.zeros(4, 2)}, CorruptAdapterError, "lora_unet_x"),
        ({"lora_unet_x.lora_down.weight": torch.zeros(2, 4), "lora_unet_x.lora_up.weight": torch.zeros(4, 2),
          "lora_unet_x.dora_scale": torch.zeros(4, 1)}, UnsupportedAdapterError, "DoRA"),
    ],
    ids=["unknown-layout", "rank-mismatch", "nan-alpha", "vector-alpha", "lycoris-missing-factor", "dora"],
)
def test_bad_files_are_refused_in_one_line_naming_the_module(tmp_path, tensors, error, message) -> None:
    path = tmp_path / "bad.safetensors"
    save_file(tensors, path)
    with pytest.raises(error, match=message):
        load_adapter(path)
    result = invoke(*["convert", str(path), "--to", "peft", "--out", str(tmp_path / "out")])
    assert_user_error(result, message.split(".*")[0])
    assert not (tmp_path / "out").exists()


def test_an_unknown_layout_names_three_example_keys_and_the_layouts_tried(tmp_path) -> None:
    save_file({f"{name}.weight": torch.zeros(2) for name in ("alpha", "beta", "gamma", "delta")},
              tmp_path / "unknown.safetensors")
    result = invoke("convert", str(tmp_path / "unknown.safetensors"), "--to", "peft", "--out", str(tmp_path / "x"))
    assert_user_error(result, "alpha.weight, beta.weight, delta.weight, …",
                      "PEFT, diffusers, kohya/A1111, ComfyUI, LyCORIS", "--input-format")
    assert not (tmp_path / "x").exists()


def test_older_diffusers_key_styles_read_through_diffusers_converters(sd, tmp_path) -> None:
    """`….processor.to_q_lora.down.weight` (attention processors) and `….lora_linear_layer.down.weight` (text
    encoder) files, as diffusers wrote them before PEFT: read to the same modules, scale 1 (no alphas, no metadata)."""
    state = load_file(sd["folder"] / "pytorch_lora_weights.safetensors")
    old = {}
    for key, tensor in state.items():
        module, part = key.rsplit(".lora_", 1)
        side = "down" if part.startswith("A") else "up"
        head, _, leaf = module.rpartition(".")
        if module.startswith("unet.") and leaf in ("to_q", "to_k", "to_v"):
            old[f"{head}.processor.{leaf}_lora.{side}.weight"] = tensor
        elif module.startswith("text_encoder."):
            old[f"{module}.lora_linear_layer.{side}.weight"] = tensor
    save_file(old, tmp_path / "old.safetensors")
    adapter = load_adapter(tmp_path / "old.safetensors")
    scales = {"unet": 2.0, "text_encoder": 1.5}  # the alphas the fixture trained with; the old file has none
    expected = {name: delta / scales[name.split(".")[0]] for name, delta in sd["deltas"].items()
                if name.startswith("text_encoder.") or name.rsplit(".", 1)[1] in ("to_q", "to_k", "to_v")}
    assert_same_deltas(adapter, expected)


def test_a_nan_in_a_source_is_named_as_such_when_converting_not_as_an_overflow(tmp_path) -> None:
    from lora_fusion.errors import NonFiniteError, OutputOverflowError

    up = torch.randn(16, 2)
    up[3, 1] = float("nan")
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.randn(2, 16),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": up}, tmp_path / "nan.safetensors")
    with pytest.raises(NonFiniteError, match="proj_in holds NaN or Inf") as caught:
        convert(tmp_path / "nan.safetensors", to="diffusers", out=tmp_path / "out")
    assert not isinstance(caught.value, OutputOverflowError) and not (tmp_path / "out").exists()


def test_a_kohya_text_encoder_lora_without_out_proj_reads_every_module(tmp_path) -> None:
    """diffusers infers the text encoder's key style from `out_proj` (to_out_lora); the reader names both styles
    explicitly, so attention and MLP modules of a LoRA without out_proj are all kept (README, Formats)."""
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for module, (out, inp) in {"self_attn_q_proj": (16, 16), "mlp_fc1": (32, 16)}.items():
        prefix = f"lora_te_text_model_encoder_layers_0_{module}"
        tensors[f"{prefix}.lora_down.weight"] = torch.randn(2, inp, generator=generator)
        tensors[f"{prefix}.lora_up.weight"] = torch.randn(out, 2, generator=generator)
    save_file(tensors, tmp_path / "te.safetensors")
    adapter = load_adapter(tmp_path / "te.safetensors")
    assert sorted(adapter.modules) == ["text_encoder.text_model.encoder.layers.0.mlp.fc1",
                                       "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"]
    down, up = (tensors[f"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_{p}.weight"] for p in ("down", "up"))
    assert torch.allclose(adapter.delta("text_encoder.text_model.encoder.layers.0.self_attn.q_proj"), up @ down)


def test_convert_records_the_sha256_of_the_file_it_read(tmp_path) -> None:
    """The single file is hashed in the background from the moment it is found (before its keys are mapped); the
    provenance still names exactly its bytes."""
    import hashlib

    generator = torch.Generator().manual_seed(0)
    prefix = "lora_unet_down_blocks_0_attentions_0_proj_in"
    save_file({f"{prefix}.lora_down.weight": torch.randn(2, 16, generator=generator),
               f"{prefix}.lora_up.weight": torch.randn(16, 2, generator=generator),
               f"{prefix}.alpha": torch.tensor(1.0)}, tmp_path / "k.safetensors")
    out = convert(tmp_path / "k.safetensors", to="diffusers", out=tmp_path / "out")
    with safe_open(str(out / "pytorch_lora_weights.safetensors"), "pt") as file:
        record = json.loads(file.metadata()["lora_fusion"])
    assert record["sources"][0]["sha256"] == hashlib.sha256((tmp_path / "k.safetensors").read_bytes()).hexdigest()


def test_the_kohya_key_map_is_made_once_per_set_of_names_and_its_refusals_name_each_source(monkeypatch) -> None:
    from lora_fusion.formats import keymaps

    calls = []
    real = keymaps._convert_sd
    monkeypatch.setattr(keymaps, "_convert_sd", lambda probe: calls.append(len(probe)) or real(probe))
    keymaps._kohya_pieces.cache_clear()
    names = {"lora_te1_text_model_encoder_layers_0_mlp_fc1": 37,
             "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": 64}
    first = keymaps.kohya_to_canonical(names, source="a")
    assert first["unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"].module == \
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    first.clear()  # each caller gets its own dict
    assert keymaps.kohya_to_canonical(dict(reversed(names.items())), source="b") == \
        keymaps.kohya_to_canonical(names, source="c") != {}
    assert len(calls) == 1  # the same names in any order: diffusers' converters ran once
    keymaps.kohya_to_canonical({**names, "lora_te1_text_model_encoder_layers_0_mlp_fc1": 38}, source="d")
    assert len(calls) == 2  # other row counts: another map
    for source in ("one", "two"):
        with pytest.raises(UnsupportedAdapterError, match=f"^{source}: diffusers' key map has no place for lora_te1_x;"):
            keymaps.kohya_to_canonical({**names, "lora_te1_x": 8}, source=source)
    assert len(calls) == 3
    keymaps._kohya_pieces.cache_clear()
