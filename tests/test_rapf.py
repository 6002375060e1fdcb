"""RAPF: the fusion formula against the official code's coefficient form, the `rapf` LoRA method (base-aware and
adapter-only), and the class-incremental trainer on a tiny random CLIPModel with synthetic images."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from lora_fusion.adapter import ModuleFactors
from lora_fusion.errors import InvalidParameterError, OutputExistsError, RecipeError
from lora_fusion.methods import ModuleGroup, get_method
from lora_fusion.methods.rapf import fuse_update_dense, fuse_update_factored, fusion_mask, rapf_fuse_weights


def official_mix_matrix(old: torch.Tensor, new: torch.Tensor, bias: float) -> torch.Tensor:
    """The official `mix_matrix` in coefficient form: R_o = S·Vᵀ, R_n = Uᵀ·W_n, W = U·(M⊙R_n + (1−M)⊙R_o)."""
    U, S, Vh = torch.linalg.svd(old.double())
    R_o = torch.diag(S) @ Vh
    R_n = U.mT @ new.double()
    D = (R_n - R_o).abs()
    M = torch.clamp(D / D.max() + bias, max=1.0)
    return U @ (M * R_n + (1 - M) * R_o)


@pytest.mark.parametrize("bias", [0.0, 0.5, 0.6, 0.8])
def test_full_weight_fusion_equals_official_coefficient_form(bias: float) -> None:
    g = torch.Generator().manual_seed(1)
    old = torch.randn(24, 24, generator=g, dtype=torch.float64)
    new = old + 0.2 * torch.randn(24, 24, generator=g, dtype=torch.float64)
    fused = rapf_fuse_weights(old, new, bias=bias)
    torch.testing.assert_close(fused, official_mix_matrix(old, new, bias), atol=1e-10, rtol=0)
    # The closed form W = W_o + U (M ⊙ Uᵀ(W_n − W_o)), written out.
    U = torch.linalg.svd(old)[0]
    C = U.mT @ (new - old)
    torch.testing.assert_close(fused, old + U @ (torch.clamp(C.abs() / C.abs().max() + bias, max=1) * C),
                               atol=1e-10, rtol=0)


def test_wide_weight_fusion_equals_coefficient_form_with_full_basis() -> None:
    # The offline adapter is text_dim × image_dim (wide): U is then square and no completion is needed (d.12).
    g = torch.Generator().manual_seed(2)
    old = torch.randn(6, 15, generator=g, dtype=torch.float64)
    new = old + torch.randn(6, 15, generator=g, dtype=torch.float64)
    U = torch.linalg.svd(old)[0]
    C_o, C_n = U.mT @ old, U.mT @ new
    M = torch.clamp((C_n - C_o).abs() / (C_n - C_o).abs().max() + 0.6, max=1)
    torch.testing.assert_close(rapf_fuse_weights(old, new, bias=0.6), U @ (M * C_n + (1 - M) * C_o))


def test_raw_basis_ablation_masks_the_raw_change() -> None:
    old = torch.zeros(2, 2, dtype=torch.float64)
    new = torch.tensor([[1.0, 0.5], [0.1, -1.0]], dtype=torch.float64)
    expected = torch.tensor([[1.0, 0.5 * 0.9], [0.1 * 0.5, -1.0]], dtype=torch.float64)
    torch.testing.assert_close(rapf_fuse_weights(old, new, bias=0.4, basis="raw"), expected)


def test_bias_one_keeps_the_new_weight_and_mask_floor_is_b() -> None:
    g = torch.Generator().manual_seed(3)
    old, new = torch.randn(8, 8, generator=g), torch.randn(8, 8, generator=g)
    torch.testing.assert_close(rapf_fuse_weights(old, new, bias=1.0), new, atol=1e-5, rtol=0)
    mask = fusion_mask(torch.randn(5, 7, generator=g), 0.3)
    assert float(mask.min()) >= 0.3 and float(mask.max()) == 1.0


def _lora(m: int, n: int, r: int, seed: int, scale: float = 0.5) -> ModuleFactors:
    g = torch.Generator().manual_seed(seed)
    return ModuleFactors(A=torch.randn(r, n, generator=g), B=torch.randn(m, r, generator=g), scale=scale)


def test_adapter_only_equals_full_space_fusion() -> None:
    m, n = 20, 11
    loras = [_lora(m, n, r, seed) for seed, r in enumerate((3, 2, 4))]
    fused = ((loras[0].scale * loras[0].B), loras[0].A)
    dense = loras[0].delta().double()
    zero_base = torch.zeros(m, n, dtype=torch.float64)
    for lora in loras[1:]:
        fused = fuse_update_factored(fused, (lora.scale * lora.B, lora.A), bias=0.4)
        dense = fuse_update_dense(zero_base, dense, lora.delta().double(), bias=0.4)
    torch.testing.assert_close((fused[0] @ fused[1]).double(), dense, atol=2e-5, rtol=0)
    assert fused[0].shape[1] <= 3 + 2 + 4


def test_base_aware_single_adapter_is_the_official_fusion() -> None:
    # W_base = a full-rank square RAPF W_o, F₀ = 0 and one adapter ΔW = W_n − W_o (docs/rapf.md tests).
    g = torch.Generator().manual_seed(4)
    old = torch.randn(10, 10, generator=g)
    new = old + 0.3 * torch.randn(10, 10, generator=g)
    adapter = ModuleFactors(A=torch.eye(10), B=new - old, scale=1.0)
    result = get_method("rapf").fn(ModuleGroup("m", [adapter], [1.0], base=old), get_method("rapf").resolve({"bias": 0.6}))
    expected = official_mix_matrix(old, new, 0.6) - old.double()
    torch.testing.assert_close((result.B @ result.A).double(), expected, atol=1e-4, rtol=0)
    assert result.stats.retained_energy == pytest.approx(1.0)


@pytest.mark.parametrize("with_base", [False, True])
def test_bias_one_makes_the_last_independent_adapter_win(with_base: bool) -> None:
    m, n = 12, 9
    loras = [_lora(m, n, 2, seed) for seed in (5, 6, 7)]
    base = torch.randn(m, n, generator=torch.Generator().manual_seed(8)) if with_base else None
    result = get_method("rapf").fn(ModuleGroup("m", loras, [1.0] * 3, base=base), get_method("rapf").resolve({"bias": 1.0}))
    torch.testing.assert_close(result.B @ result.A, loras[-1].delta(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("with_base", [False, True])
def test_bias_one_makes_chained_adapters_add_up(with_base: bool) -> None:
    # docs/rapf.md: in RAPF's own (chained) regime W_n = W_o + ΔW_t, so M ≡ 1 gives F_t = F_{t−1} + ΔW_t.
    m, n = 12, 9
    loras = [_lora(m, n, 2, seed) for seed in (5, 6, 7)]
    base = torch.randn(m, n, generator=torch.Generator().manual_seed(8)) if with_base else None
    params = get_method("rapf").resolve({"bias": 1.0, "chained": True, "rank": 6})
    result = get_method("rapf").fn(ModuleGroup("m", loras, [1.0] * 3, base=base), params)
    torch.testing.assert_close(result.B @ result.A, sum(lora.delta() for lora in loras), atol=1e-4, rtol=0)


def test_rapf_method_records_retained_energy_of_the_truncation() -> None:
    m, n = 16, 14
    loras = [_lora(m, n, 3, seed) for seed in (9, 10)]
    base = torch.randn(m, n, generator=torch.Generator().manual_seed(11))
    group = ModuleGroup("m", loras, [1.0, 1.0], base=base)
    full = torch.zeros(m, n, dtype=torch.float64)
    for lora in loras:
        full = fuse_update_dense(base.double(), full, lora.delta().double(), bias=0.6)
    S = torch.linalg.svdvals(full)
    result = get_method("rapf").fn(group, get_method("rapf").resolve({"bias": 0.6, "rank": 2}))
    assert result.A.shape[0] == 2
    assert result.stats.retained_energy == pytest.approx(float((S[:2] ** 2).sum() / (S**2).sum()), rel=1e-4)
    assert result.stats.truncated


def test_rapf_registration_and_bias_domain() -> None:
    spec = get_method("rapf")
    assert spec.uses_base and spec.resolve({}).bias == 0.6
    with pytest.raises(InvalidParameterError):
        spec.resolve({"bias": 1.5})
    with pytest.raises(InvalidParameterError):
        spec.resolve({"density": 0.5})


# ---------------------------------------------------------------------------------------------------------------
# The class-incremental trainer on a tiny random CLIPModel.


class ByteTokenizer:
    """A stand-in for CLIP's tokenizer: bytes → ids 1..97, BOS 98, EOS 99 (CLIP pools at the EOS token)."""

    def __call__(self, texts: list[str], **_: object) -> dict[str, torch.Tensor]:
        rows = [[98] + [1 + b % 97 for b in text.encode()][:38] + [99] for text in texts]
        width = max(map(len, rows))
        ids = torch.tensor([row + [0] * (width - len(row)) for row in rows])
        return {"input_ids": ids, "attention_mask": (ids != 0).long()}


def build_tiny_clip():
    """A 16-d random CLIPModel (same weights in every process: a fixed seed on the CPU) with the byte tokenizer."""
    from transformers import CLIPConfig, CLIPModel

    from lora_fusion.cil.encoders import ClipEncoders

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=40, eos_token_id=99, bos_token_id=98,
                         pad_token_id=0),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=16, patch_size=8),
        projection_dim=16,
    )
    return ClipEncoders(CLIPModel(config), ByteTokenizer())


@pytest.fixture(scope="module")
def tiny_clip():
    return build_tiny_clip()


CLASSES = ["apple", "bus", "cat", "dog", "eel", "fox"]


def synthetic_dataset(train_per_class: int = 24, test_per_class: int = 8, seed: int = 0):
    """Six classes of 16×16 RGB images: a class-specific colour and stripe pattern plus noise."""
    from lora_fusion.cil.data import array_dataset

    g = torch.Generator().manual_seed(seed)
    prototypes = torch.rand(len(CLASSES), 3, 16, 16, generator=g) * 255

    def draw(count: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.arange(len(CLASSES)).repeat_interleave(count)
        noise = torch.randn(labels.numel(), 3, 16, 16, generator=g) * 20
        return (prototypes[labels] + noise).clamp(0, 255).to(torch.uint8), labels

    return array_dataset("synthetic", CLASSES, draw(train_per_class), draw(test_per_class))


def tiny_recipe(tmp_path: Path, **changes: object):
    from lora_fusion.cil.recipe import validated

    data = {"name": "tiny", "data": {"source": "fashion_mnist"}, "initial_classes": 2, "increment": 2,
            "train": {"epochs": 4, "batch_size": 16, "lr": 0.02, "milestones": [3]},
            "rapf": {"beta": 0.5, "threshold": 2.0, "bias": 0.6}, "seed": 3, "cpu": True,
            "cache_dir": str(tmp_path / "cache"), "out": str(tmp_path / "run"), **changes}
    return validated(data, origin="test")


def test_whole_run_writes_metrics_plot_and_adapters(tmp_path: Path, tiny_clip) -> None:
    from lora_fusion.cil.trainer import run_cil

    result = run_cil(tiny_recipe(tmp_path), encoders=tiny_clip, dataset=synthetic_dataset(), progress=False)
    assert len(result.accuracies) == 3 and [len(row) for row in result.matrix] == [1, 2, 3]
    assert result.tasks == [["apple", "bus"], ["cat", "dog"], ["eel", "fox"]]
    assert result.accuracies[0] > 0.75  # two well-separated classes, a few epochs
    assert [len(epochs) for epochs in result.losses] == [4, 4, 4]  # each task's mean loss per epoch
    assert all(math.isfinite(x) for epochs in result.losses for x in epochs)
    assert result.losses[0][-1] < result.losses[0][0]  # the first task is learnt
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["losses"] == result.losses
    assert result.hard_pairs[1]  # α = 2 pairs every old class with every new one, so the hinge runs
    out = tmp_path / "run"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["last"] == pytest.approx(result.last) and metrics["avg"] == pytest.approx(result.avg)
    assert (out / "accuracy.png").stat().st_size > 1000
    from safetensors.torch import load_file

    assert load_file(str(out / "task_02" / "adapter.safetensors"))["weight"].shape == (16, 16)


def test_resumed_run_equals_uninterrupted_run(tmp_path: Path, tiny_clip) -> None:
    from safetensors.torch import load_file

    from lora_fusion.cil.trainer import run_cil

    dataset = synthetic_dataset()
    whole = run_cil(tiny_recipe(tmp_path, out=str(tmp_path / "whole")), encoders=tiny_clip, dataset=dataset,
                    progress=False)
    recipe = tiny_recipe(tmp_path, out=str(tmp_path / "resumed"))
    partial = run_cil(recipe, encoders=tiny_clip, dataset=dataset, stop_after=0, progress=False)
    assert len(partial.accuracies) == 1
    resumed = run_cil(recipe, encoders=tiny_clip, dataset=dataset, progress=False)
    assert resumed.accuracies == whole.accuracies and resumed.matrix == whole.matrix
    assert resumed.losses == whole.losses  # the finished task's losses come back from metrics.json
    final = [load_file(str(tmp_path / d / "task_02" / "adapter.safetensors"))["weight"] for d in ("whole", "resumed")]
    assert torch.equal(final[0], final[1])
    with pytest.raises(OutputExistsError):
        run_cil(tiny_recipe(tmp_path, out=str(tmp_path / "resumed"), seed=4), encoders=tiny_clip, dataset=dataset,
                progress=False)


def test_feature_cache_hits_and_invalidates(tmp_path: Path, tiny_clip) -> None:
    from accelerate import Accelerator

    from lora_fusion.cil.cache import cache_key, cached_features
    from lora_fusion.cil.encoders import ClipEncoders, Preprocessing

    accelerator = Accelerator(cpu=True)
    split = synthetic_dataset().train
    first, info = cached_features(tiny_clip, split, accelerator=accelerator, cache_dir=tmp_path)
    again, info_again = cached_features(tiny_clip, split, accelerator=accelerator, cache_dir=tmp_path)
    assert not info["hit"] and info_again["hit"] and torch.equal(first, again)
    key = cache_key(tiny_clip, split)
    other_data = synthetic_dataset(seed=1).train
    assert cache_key(tiny_clip, other_data) != key
    assert cache_key(tiny_clip, split, precision="fp16") != key  # half-precision features are other features
    p = tiny_clip.preprocessing
    resized = ClipEncoders(tiny_clip.model, tiny_clip.tokenizer,
                           preprocessing=Preprocessing(p.size, p.crop, p.mean, p.std, "bilinear"))
    assert cache_key(resized, split) != key
    import copy

    changed = copy.deepcopy(tiny_clip.model)
    with torch.no_grad():
        changed.visual_projection.weight[0, 0] += 1.0
    assert cache_key(ClipEncoders(changed, tiny_clip.tokenizer), split) != key


def test_extraction_in_batches_keeps_order(tiny_clip) -> None:
    from accelerate import Accelerator

    from lora_fusion.cil.cache import extract_features

    split = synthetic_dataset(train_per_class=3).train
    features = extract_features(tiny_clip, split, accelerator=Accelerator(cpu=True), batch_size=5)
    direct = tiny_clip.encode_images(tiny_clip.preprocessing(split.load(range(len(split)))))
    torch.testing.assert_close(features, direct, atol=1e-5, rtol=0)


@pytest.mark.parametrize("processes", [3, 4])
def test_shares_of_several_processes_gather_in_row_order(tiny_clip, processes) -> None:
    # 18 images on 4 processes: shares of 5, 5, 5, 3; the padding must end up after the last row, not in between.
    import contextlib
    import types

    from lora_fusion.cil.cache import extract_features

    split = synthetic_dataset(train_per_class=3).train
    assert len(split) == 18
    shares = []

    def rank(index: int) -> types.SimpleNamespace:
        return types.SimpleNamespace(
            num_processes=processes, process_index=index, device=torch.device("cpu"), is_local_main_process=False,
            autocast=contextlib.nullcontext, gather=lambda local: shares.append(local) or local,
        )

    for index in range(processes):
        extract_features(tiny_clip, split, accelerator=rank(index), batch_size=4)
    gathered = torch.cat(shares)[: len(split)]  # what accelerator.gather hands every process, cut to n
    direct = tiny_clip.encode_images(tiny_clip.preprocessing(split.load(range(len(split)))))
    torch.testing.assert_close(gathered, direct, atol=1e-5, rtol=0)


def test_hard_pairs_and_hinge() -> None:
    from lora_fusion.cil.trainer import hard_pairs, hinge_loss

    text = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.2]]), dim=-1)
    assert hard_pairs(text, [0, 1], [2], threshold=0.5) == [(0, 2)]
    adapted = torch.tensor([[1.0, 0.0]])
    expected = max(0.0, float(text[2] @ torch.tensor([1.0, 0.0])) - 1.0 + 0.1)
    assert float(hinge_loss(adapted, text, torch.tensor([[0, 2]]), 0.1)) == pytest.approx(expected)


def test_gaussian_statistics_and_shrinkage() -> None:
    from lora_fusion.cil.gaussian import ClassGaussian, fecam_shrinkage

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 3, generator=g) @ torch.tensor([[2.0, 0.0, 0.0], [0.5, 1.0, 0.0], [0.0, 0.0, 0.5]]) + 3
    gauss = ClassGaussian.fit(x)
    samples = gauss.sample(20000, torch.Generator().manual_seed(1))
    torch.testing.assert_close(torch.cov(samples.mT), torch.cov(x.mT), atol=0.08, rtol=0.05)
    cov = torch.tensor([[2.0, 0.5], [0.5, 4.0]])
    torch.testing.assert_close(fecam_shrinkage(cov), torch.tensor([[5.0, 1.0], [1.0, 7.0]]))


def test_bad_inputs_are_one_line_user_errors(tmp_path: Path, tiny_clip) -> None:
    from lora_fusion.cil.data import fashion_mnist, split_tasks
    from lora_fusion.cil.errors import DatasetNotFoundError, EmptyTaskError, FeatureDimensionError, UnknownClassError
    from lora_fusion.cil.trainer import run_cil

    dataset = synthetic_dataset()
    with pytest.raises(UnknownClassError, match="'zebra'.*apple, bus"):
        split_tasks(dataset, initial=2, increment=2, class_order=["apple", "zebra"])
    with pytest.raises(EmptyTaskError):
        split_tasks(dataset, initial=8, increment=2)
    with pytest.raises(DatasetNotFoundError, match="apt-get install dataset-fashion-mnist"):
        fashion_mnist(tmp_path)
    with pytest.raises(InvalidParameterError, match="threshold"):
        tiny_recipe(tmp_path, rapf={"threshold": 2.5})
    with pytest.raises(InvalidParameterError, match="bias"):
        tiny_recipe(tmp_path, rapf={"bias": -0.1})
    with pytest.raises(RecipeError, match="unknown key"):
        tiny_recipe(tmp_path, epochs=3)
    from lora_fusion.cil.errors import EncoderNotFoundError
    from lora_fusion.cil.trainer import build_encoders

    with pytest.raises(EncoderNotFoundError, match="cannot load the CLIP model"):
        build_encoders(tiny_recipe(tmp_path, encoders={"kind": "clip", "model": str(tmp_path / "no-clip" / "here")}))
    run_cil(tiny_recipe(tmp_path), encoders=tiny_clip, dataset=dataset, stop_after=0, progress=False)
    with open(tmp_path / "run" / "metrics.json") as f:
        assert json.load(f)["accuracies"]
    # A saved adapter whose shape the encoders cannot use (another encoder pair wrote it): refused, not reshaped.
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(8, 16)}, str(tmp_path / "run" / "task_00" / "adapter.safetensors"))
    with pytest.raises(FeatureDimensionError, match="another `out`"):
        run_cil(tiny_recipe(tmp_path), encoders=tiny_clip, dataset=dataset, progress=False)


def test_cli_reports_bad_recipe_with_exit_2(tmp_path: Path) -> None:
    from lora_fusion_cli.main import app

    recipe = tmp_path / "r.yaml"
    recipe.write_text("data: {source: fashion_mnist, root: %s}\nrapf: {bias: 0.6}\n" % (tmp_path / "nowhere"))
    result = CliRunner().invoke(app, ["cil", "run", str(recipe)])
    assert result.exit_code == 2 and "Fashion-MNIST not found" in result.output and "Traceback" not in result.output
    recipe.write_text("data: {source: fashion_mnist}\nrapf: {threshold: 0}\n")
    result = CliRunner().invoke(app, ["cil", "run", str(recipe)])
    assert result.exit_code == 2 and result.output.count("\n") == 1 and "threshold" in result.output


def test_merge_with_base_model_fuses_in_order_against_base_weights(make_llama_lora, llama_dir: Path) -> None:
    from safetensors.torch import load_file

    from lora_fusion import load_adapter
    from lora_fusion.api import merge

    first, second = make_llama_lora(seed=1), make_llama_lora(seed=2)
    merged = merge([first, second], method="rapf", bias=0.5, rank=64, base_model=llama_dir)
    module = "model.layers.0.self_attn.q_proj"
    base = load_file(str(llama_dir / "model.safetensors"))[f"{module}.weight"].float()
    fused = torch.zeros_like(base, dtype=torch.float64)
    for path in (first, second):
        fused = fuse_update_dense(base.double(), fused, load_adapter(path).delta(module).double(), bias=0.5)
    torch.testing.assert_close(merged.delta(module).double(), fused, atol=1e-4, rtol=1e-4)
    # Without the base model the basis comes from the adapters themselves: a different, adapter-only fusion.
    adapter_only = merge([first, second], method="rapf", bias=0.5, rank=64)
    assert not torch.allclose(adapter_only.delta(module), merged.delta(module), atol=1e-3)


def test_image_folder_and_cifar100_readers(tmp_path: Path) -> None:
    import pickle

    import numpy as np
    from PIL import Image

    from lora_fusion.cil.data import cifar100, image_folder

    for which in ("train", "test"):
        for k, name in enumerate(("n01_cat", "n02_dog")):
            (tmp_path / "imgs" / which / name).mkdir(parents=True)
            for i in range(3):
                image = Image.new("RGB", (20 + i, 12), color=(40 * k, 10 * i, 0))
                image.save(tmp_path / "imgs" / which / name / f"{i}.png")
    folder = image_folder(tmp_path / "imgs", train_per_class=2, class_names={"n01_cat": "cat"})
    assert folder.class_names == ["cat", "n02_dog"] and folder.train.labels.tolist() == [0, 0, 1, 1]
    image = folder.train.load([3])[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 12, 21) and int(image[0, 0, 0]) == 40

    root = tmp_path / "cifar-100-python"
    root.mkdir()
    names = [f"class_{i}" for i in range(4)]
    with open(root / "meta", "wb") as f:
        pickle.dump({"fine_label_names": names}, f)
    for which, count in (("train", 8), ("test", 4)):
        pixels = np.arange(count * 3072, dtype=np.int64).reshape(count, 3072) % 256
        with open(root / which, "wb") as f:
            pickle.dump({"data": pixels.astype(np.uint8), "fine_labels": [i % 4 for i in range(count)]}, f)
    cifar = cifar100(tmp_path, train_per_class=1)
    assert cifar.class_names == names and cifar.train.labels.tolist() == [0, 1, 2, 3]
    assert cifar.train.load([1])[0].shape == (3, 32, 32) and len(cifar.test) == 4


TWO_PROCESS_RUN = """
import sys, torch
from safetensors.torch import save_file
from tests.test_rapf import build_tiny_clip, synthetic_dataset, tiny_recipe
from accelerate import Accelerator
from lora_fusion.cil.cache import extract_features
from lora_fusion.cil.trainer import run_cil
from pathlib import Path
torch.set_num_threads(1)
encoders, dataset, accelerator = build_tiny_clip(), synthetic_dataset(train_per_class=7), Accelerator(cpu=True)
encoded, encode = [], encoders.encode_images
encoders.encode_images = lambda pixels: encoded.append(pixels.shape[0]) or encode(pixels)
features = extract_features(encoders, dataset.train, accelerator=accelerator, batch_size=4)
mine = sum(encoded)
result = run_cil(tiny_recipe(Path(sys.argv[1])), encoders=encoders, dataset=dataset, accelerator=accelerator,
                 progress=False)
save_file({"features": features, "accuracies": torch.tensor(result.accuracies), "encoded": torch.tensor(mine)},
          f"{sys.argv[1]}/rank{accelerator.process_index}.safetensors")
"""


def test_two_processes_split_extraction_and_train_consistently(tmp_path: Path, tiny_clip) -> None:
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    script = tmp_path / "two_process_run.py"
    script.write_text(TWO_PROCESS_RUN)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    env.update(PYTHONPATH=str(Path(__file__).resolve().parent.parent), OMP_NUM_THREADS="1")
    torchrun = Path(sys.executable).with_name("torchrun")
    launched = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", str(script), str(tmp_path)],
                              capture_output=True, text=True, env=env, timeout=180)
    assert launched.returncode == 0, launched.stderr[-2000:]
    ranks = [load_file(str(tmp_path / f"rank{i}.safetensors")) for i in range(2)]
    dataset = synthetic_dataset(train_per_class=7)
    direct = tiny_clip.encode_images(tiny_clip.preprocessing(dataset.train.load(range(len(dataset.train)))))
    for rank in ranks:  # each process encoded half of the 42 images; the gathered whole is in order
        assert int(rank["encoded"]) == 21
        torch.testing.assert_close(rank["features"], direct, atol=1e-5, rtol=0)
    assert torch.equal(ranks[0]["accuracies"], ranks[1]["accuracies"])  # one model, kept in sync by DDP
    assert len(json.loads((tmp_path / "run" / "metrics.json").read_text())["accuracies"]) == 3
    # The same run on one process: the data-parallel step equals the one-process step up to rounding, so the final
    # metrics agree (a margin of one test sample for a rounding-level flip).
    from lora_fusion.cil.trainer import run_cil

    single = run_cil(tiny_recipe(tmp_path / "single"), encoders=tiny_clip, dataset=dataset, progress=False)
    assert ranks[0]["accuracies"].tolist() == pytest.approx(single.accuracies, abs=0.05)


def test_image_folder_with_split_file(tmp_path: Path) -> None:
    from PIL import Image

    from lora_fusion.cil.data import image_folder
    from lora_fusion.cil.errors import DatasetNotFoundError

    for folder in ("n02", "n01"):
        (tmp_path / folder).mkdir()
        for i in range(3):
            Image.new("RGB", (8, 8)).save(tmp_path / folder / f"art_{i}.jpg")
    split = tmp_path / "split.txt"
    split.write_text("train\nn02/art_2.jpg\nn01/art_0.jpg\nn02/art_0.jpg\ntest\nn01/art_1.jpg\nn02/art_1.jpg\n")
    data = image_folder(tmp_path, split_file=split, class_names={"n01": "goldfish"})
    assert data.class_names == ["goldfish", "n02"]
    assert [p.name for p in data.train.files] == ["art_0.jpg", "art_2.jpg", "art_0.jpg"]
    assert data.train.labels.tolist() == [0, 1, 1] and data.test.labels.tolist() == [0, 1]
    split.write_text("train\nn01/art_9.jpg\ntest\nn02/art_1.jpg\n")
    with pytest.raises(DatasetNotFoundError, match="art_9.jpg is listed but missing"):
        image_folder(tmp_path, split_file=split)


BF16_RUN = """
import sys
from pathlib import Path
from tests.test_rapf import build_tiny_clip, synthetic_dataset, tiny_recipe
from lora_fusion.cil.trainer import run_cil
run_cil(tiny_recipe(Path(sys.argv[1]), mixed_precision="bf16"), encoders=build_tiny_clip(),
        dataset=synthetic_dataset(), progress=False)
"""


def test_bf16_mixed_precision_run(tmp_path: Path) -> None:
    # Accelerate fixes the precision once per process, so this runs in a fresh one.
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", BF16_RUN, str(tmp_path)], capture_output=True, text=True, env=env,
                          timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert len(metrics["accuracies"]) == 3 and metrics["accuracies"][0] > 0.75


def test_evaluation_per_task_and_zero_shot_rule() -> None:
    from lora_fusion.cil.evaluate import evaluate_seen, last_and_avg

    text = torch.eye(4)
    features = torch.tensor([[2.0, 0.1, 0, 0], [0.1, 3.0, 0, 0], [0, 0, 0.2, 1.0], [5.0, 0, 0, 0], [0, 0, 0, 1.0]])
    positions = torch.tensor([0, 1, 2, 3, -1])  # the last image's class is outside the class order
    # Zero-shot (weight None): nearest text feature of g(x) itself; after task 0 only classes 0-1 count.
    overall, per_task = evaluate_seen(None, features, positions, text, [[0, 1]])
    assert overall == 1.0 and per_task == [1.0]
    overall, per_task = evaluate_seen(None, features, positions, text, [[0, 1], [2, 3]])
    assert overall == 0.5 and per_task == [1.0, 0.0]  # image 2 → class 3, image 3 → class 0
    swap = torch.eye(4)[[0, 1, 3, 2]]  # an adapter that swaps the last two coordinates
    assert evaluate_seen(swap, features, positions, text, [[0, 1], [2, 3]])[1] == [1.0, 0.5]  # image 2 now right
    assert last_and_avg([1.0, 0.5]) == (0.5, 0.75)


def test_every_shipped_recipe_is_valid() -> None:
    from lora_fusion.cil.recipe import load_recipe

    recipes = sorted((Path(__file__).resolve().parent.parent / "recipes").glob("rapf_*.yaml"))
    assert len(recipes) >= 15
    for path in recipes:
        recipe = load_recipe(path)
        assert recipe.name == path.stem, path


@pytest.mark.parametrize("per_class", [8, 12])
def test_gradient_accumulation_of_two_half_batches_equals_one_batch(tmp_path: Path, tiny_clip, per_class) -> None:
    # Task 0 (no replay, no hinge) has 16 or 24 training images: batches of 16, or groups of two micro-batches of 8
    # (each loss halved; with 24 images the last group of each epoch is a single micro-batch, as the last batch of 16
    # is a batch of 8) make the same Adam steps.
    from safetensors.torch import load_file

    from lora_fusion.cil.trainer import run_cil

    dataset = synthetic_dataset(train_per_class=per_class)
    weights = []
    for name, batch, accumulation in (("whole", 16, 1), ("halves", 8, 2)):
        train = {"epochs": 3, "batch_size": batch, "lr": 0.02, "milestones": [2], "gradient_accumulation": accumulation}
        recipe = tiny_recipe(tmp_path / name, train=train)
        run_cil(recipe, encoders=tiny_clip, dataset=dataset, stop_after=0, progress=False)
        weights.append(load_file(str(tmp_path / name / "run" / "task_00" / "adapter.safetensors"))["weight"])
    torch.testing.assert_close(weights[0], weights[1], atol=1e-5, rtol=1e-4)
