"""Issue 18: the controlled CLIP-like space of `experiments.rapf_alignment_sweep`, the ConSE features, and the feature
source (`lora_fusion.cil.features`) that serves both to the unchanged trainer. Tiny code-built inputs only."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from experiments.rapf_alignment_sweep import (
    aligned_space, calibrate_scale, conse_features, imagenet_categories, real_covariances, zero_shot_accuracy,
)
from lora_fusion.cil.features import PrecomputedFeatures, feature_dataset
from lora_fusion.cil.recipe import CILRecipe
from lora_fusion.cil.trainer import run_cil


def _anchors(classes: int = 12, dim: int = 8, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(classes, dim, generator=torch.Generator().manual_seed(seed)), dim=-1)


def _covariances(k: int = 3, dim: int = 16, seed: int = 1) -> torch.Tensor:
    # Anisotropic SPD matrices, like real feature covariances: a few large directions and a small floor.
    g = torch.Generator().manual_seed(seed)
    factors = torch.randn(k, dim, 4, generator=g, dtype=torch.float64)
    return factors @ factors.mT + 0.05 * torch.eye(dim, dtype=torch.float64)


def test_means_follow_the_formula_and_text_geometry_is_kept() -> None:
    t, covs = _anchors(), _covariances()
    for rho in (0.0, 0.3, 1.0):
        space = aligned_space(t, covs, rho=rho, scale=2.5, train_per_class=2, test_per_class=2, seed=4)
        # text = Q·t̂ with orthonormal Q: unit rows and the same cosines (so the same hard pairs under α).
        torch.testing.assert_close(space.text.norm(dim=-1), torch.ones(12), atol=1e-5, rtol=0)
        torch.testing.assert_close(space.text @ space.text.mT, t @ t.mT, atol=1e-5, rtol=0)
        # μ_c/s − ρ·Q·t̂_c = (1 − ρ)·Q·r_c, and Q·r_c is a unit vector.
        rest = (space.means / 2.5 - rho * space.text).norm(dim=-1)
        torch.testing.assert_close(rest, torch.full((12,), 1.0 - rho), atol=1e-5, rtol=0)
    assert space.train[0].shape == (24, 16) and space.train[1].tolist() == [c for c in range(12) for _ in range(2)]


def test_zero_shot_accuracy_rises_with_rho() -> None:
    t, covs = _anchors(), _covariances()
    accuracy = []
    for rho in (0.0, 0.25, 0.5, 0.75, 1.0):
        space = aligned_space(t, covs, rho=rho, scale=10.0, train_per_class=1, test_per_class=150, seed=0)
        accuracy.append(zero_shot_accuracy(*space.test, space.text))
    assert accuracy[0] < 0.25  # chance is 1/12: random directions carry no text information
    assert accuracy[-1] > 0.9
    assert all(a < b for a, b in zip(accuracy, accuracy[1:])), accuracy


def test_samples_have_the_requested_class_covariance() -> None:
    t, covs = _anchors(classes=4), _covariances(k=3)
    space = aligned_space(t, covs, rho=0.5, scale=1.0, train_per_class=6000, test_per_class=1, seed=2)
    x, y = space.train
    for c in (0, 3):  # class 3 reuses covariance 0 (c mod K)
        rows = x[y == c].double()
        torch.testing.assert_close(rows.mean(0), space.means[c].double(), atol=0.12, rtol=0)
        torch.testing.assert_close(torch.cov(rows.mT), covs[0], atol=0.35, rtol=0.08)


def test_the_space_is_seeded() -> None:
    t, covs = _anchors(), _covariances()
    a = aligned_space(t, covs, rho=0.5, scale=3.0, train_per_class=3, test_per_class=2, seed=7)
    b = aligned_space(t, covs, rho=0.5, scale=3.0, train_per_class=3, test_per_class=2, seed=7)
    c = aligned_space(t, covs, rho=0.5, scale=3.0, train_per_class=3, test_per_class=2, seed=8)
    for left, right in ((a.train[0], b.train[0]), (a.test[0], b.test[0]), (a.text, b.text), (a.means, b.means)):
        assert torch.equal(left, right)
    assert not torch.allclose(a.train[0], c.train[0]) and not torch.allclose(a.text, c.text)
    with pytest.raises(ValueError, match="rho"):
        aligned_space(t, covs, rho=1.5, scale=1.0, train_per_class=1, test_per_class=1, seed=0)


def test_calibrated_scale_hits_the_zero_shot_target() -> None:
    t, covs = _anchors(), _covariances()
    scale = calibrate_scale(t, covs, target=0.6, test_per_class=100, seed=0, steps=25)
    space = aligned_space(t, covs, rho=1.0, scale=scale, train_per_class=0, test_per_class=100, seed=0)
    assert abs(zero_shot_accuracy(*space.test, space.text) - 0.6) < 0.02
    smaller = aligned_space(t, covs, rho=1.0, scale=scale / 3, train_per_class=0, test_per_class=100, seed=0)
    assert zero_shot_accuracy(*smaller.test, smaller.text) < 0.5


def test_real_covariances_project_on_the_leading_within_class_directions() -> None:
    g = torch.Generator().manual_seed(3)
    labels = torch.arange(3).repeat_interleave(200)
    noise = torch.randn(600, 10, generator=g) * torch.tensor([5.0, 4.0, 3.0] + [0.1] * 7)
    features = noise + 100 * torch.randn(3, 10, generator=g)[labels]  # class means must not leak into Σ
    covs, info = real_covariances(features, labels, dim=3)
    assert covs.shape == (3, 3, 3) and info["classes"] == 3 and info["samples_per_class"] == [200] * 3
    assert info["variance_kept"] > 0.98
    assert float(torch.linalg.eigvalsh(covs).min()) > 0
    torch.testing.assert_close(covs[0].diagonal().sqrt(), torch.tensor([5.0, 4.0, 3.0], dtype=torch.float64),
                               rtol=0.2, atol=0)


def test_conse_is_the_probability_weighted_mean_of_the_top_label_embeddings() -> None:
    g = torch.Generator().manual_seed(5)
    classifier = torch.nn.Linear(6, 5)
    embeddings = F.normalize(torch.randn(5, 4, generator=g), dim=-1)
    pooled = torch.randn(3, 6, generator=g)
    probs = classifier(pooled).softmax(-1).detach()
    torch.testing.assert_close(conse_features(pooled, classifier, embeddings, top=5), probs @ embeddings)
    top1 = conse_features(pooled, classifier, embeddings, top=1)
    torch.testing.assert_close(top1, embeddings[probs.argmax(-1)])


def test_imagenet_categories_read_from_a_wheel(tmp_path: Path) -> None:
    wheel = tmp_path / "torchvision-0-py3-none-any.whl"
    names = [f"class {i}" for i in range(1000)]
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("torchvision/models/_meta.py", f"_IMAGENET_CATEGORIES = {names!r}\nOTHER = 1\n")
    assert imagenet_categories(wheel) == names
    short = tmp_path / "short.whl"
    with zipfile.ZipFile(short, "w") as archive:
        archive.writestr("torchvision/models/_meta.py", "_IMAGENET_CATEGORIES = ['a', 'b']\n")
    with pytest.raises(SystemExit, match="1000"):
        imagenet_categories(short)


def test_feature_source_runs_through_the_unchanged_trainer(tmp_path: Path) -> None:
    t, covs = _anchors(classes=6, dim=8), _covariances(k=2)
    space = aligned_space(t, covs, rho=1.0, scale=8.0, train_per_class=20, test_per_class=10, seed=0)
    names = [f"class{c}" for c in range(6)]
    dataset = feature_dataset("tiny", names, space.train, space.test)
    prompt = "a good photo of a {}."
    source = PrecomputedFeatures({prompt.format(n): space.text[c] for c, n in enumerate(names)}, image_dim=16,
                                 name="tiny")
    recipe = CILRecipe.model_validate({
        "name": "tiny", "data": {"source": "image_folder"}, "initial_classes": 2, "increment": 2, "prompt": prompt,
        "train": {"epochs": 2, "batch_size": 16}, "rapf": {"threshold": 2.0, "beta": 0.5, "replay_classes": 1},
        "seed": 0, "cpu": True, "mixed_precision": "no", "cache_dir": str(tmp_path / "cache"),
        "out": str(tmp_path / "run"),
    })
    result = run_cil(recipe, encoders=source, dataset=dataset, resume=False, progress=False)
    assert len(result.accuracies) == 3 and all(0.0 <= a <= 1.0 for a in result.accuracies)
    assert sum(len(p) for p in result.hard_pairs) > 0  # α = 2 pairs every old class with every new one
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2  # train and test rows went through the cache
    again = run_cil(recipe.model_copy(update={"out": str(tmp_path / "run2")}), encoders=source, dataset=dataset,
                    resume=False, progress=False)
    assert again.accuracies == result.accuracies
    with pytest.raises(KeyError, match="no stored text feature"):
        source.encode_texts(["a good photo of a stranger."])


def test_feature_source_fingerprints_and_shapes() -> None:
    text = {"a": torch.ones(3), "b": torch.zeros(3)}
    one = PrecomputedFeatures(text, image_dim=4, name="x")
    assert one.text_dim == 3 and one.fingerprint() == PrecomputedFeatures(text, image_dim=4, name="x").fingerprint()
    assert one.fingerprint() != PrecomputedFeatures(text, image_dim=4, name="y").fingerprint()
    assert one.fingerprint() != PrecomputedFeatures({**text, "b": torch.ones(3)}, image_dim=4, name="x").fingerprint()
    assert one.preprocessing([torch.ones(4), torch.zeros(4)]).shape == (2, 4)
    with pytest.raises(ValueError, match="5-d, not 4"):
        one.encode_images(torch.ones(2, 5))
    with pytest.raises(ValueError, match="different sizes"):
        PrecomputedFeatures({"a": torch.ones(3), "b": torch.ones(2)}, image_dim=4, name="x")
    rows = torch.randn(5, 4)
    data = feature_dataset("d", ["p", "q"], (rows, torch.tensor([0, 1, 0, 1, 0])), (rows[:2], torch.tensor([0, 1])))
    other = feature_dataset("d", ["p", "q"], (rows + 1, torch.tensor([0, 1, 0, 1, 0])), (rows[:2], torch.tensor([0, 1])))
    assert data.train.fingerprint != other.train.fingerprint and data.test.fingerprint == other.test.fingerprint
    assert torch.equal(torch.stack(data.train.load([1, 3])), rows[[1, 3]])
    with pytest.raises(ValueError, match="N×d"):
        feature_dataset("d", ["p"], (rows, torch.tensor([0, 1])), (rows, torch.zeros(5, dtype=torch.long)))
