"""ICM-Fusion in the toy world of issue 5 §7 (MLP 16 → 64 → 5, rank-4 LoRAs on both layers): seconds on a CPU."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from lora_fusion import load_adapter
from lora_fusion.errors import InvalidParameterError
from lora_fusion.icm.api import icm_merge
from lora_fusion.icm.errors import (
    BaseModelMismatchError,
    FVAECheckpointError,
    LayoutMismatchError,
    UnknownSupportLabelError,
)
from lora_fusion.icm.fusion import FusionConfig, fuse, project_conflicts
from lora_fusion.icm.fvae import FVAE, FVAEConfig, vae_loss
from lora_fusion.icm.lora_io import LoraLayout, Normaliser, adapter_factors, flatten, to_adapter, unflatten
from lora_fusion.icm.meta import MetaTrainConfig, TaskSnapshots, evaluate_meta_loss, load_fvae, meta_train
from lora_fusion.icm.toy import make_toy_world, toy_layout
from lora_fusion.icm.training import train_joint_lora
from lora_fusion_cli.icm import icm_app

N_TASKS = 4
# Real WordNet 3.0 lines, enough for the fixed splits of its tasks: no test needs the wordnet-base package.
WORDNET_SAMPLE = Path(__file__).resolve().parent / "data" / "wordnet-sample"


@pytest.fixture(scope="module")
def toy():
    """The toy world, its layout, per task (snapshots, support, query) and a meta-trained F-VAE."""
    torch.manual_seed(0)
    world, tasks = make_toy_world(n_tasks=N_TASKS, seed=0)
    layout = toy_layout(world)
    generator = torch.Generator().manual_seed(1)
    data, queries = [], []
    for index, task in enumerate(tasks):
        train, support, query = (task.sample(n, generator) for n in (400, 10, 300))
        _, snapshots = train_joint_lora(world, [(task.name, train)], layout, steps=120, seed=index, lr=1e-2,
                                        snapshots=(6, 4, 2, 1)[index])
        data.append(TaskSnapshots(task.name, snapshots, support))
        queries.append(query)
    config = MetaTrainConfig(steps=150, cpu=True, log_every=50, seed=0)  # logging does not change the training
    trained = meta_train(world, layout, data, config, log=lambda line: None)
    return world, layout, data, queries, trained


def test_toy_layout_has_the_documented_size(toy):
    _, layout, data, _, _ = toy
    assert layout.numel == 596  # docs/icm.md: A₁ 4×16, B₁ 64×4, A₂ 4×64, B₂ 5×4
    assert [d.flats.shape[0] for d in data] == [6, 4, 2, 1]  # uneven (long-tailed) snapshot counts


@pytest.mark.parametrize("mode", ["pooled", "per_checkpoint"])
def test_flatten_normalise_unflatten_is_exact(toy, mode):
    _, layout, data, _, _ = toy
    flats = torch.cat([d.flats for d in data])
    normaliser = Normaliser.fit(flats, layout, mode)
    for flat in flats:
        normalised = normaliser.normalise(flat)
        back = normaliser.denormalise(normalised, normaliser.stats_of(flat))
        torch.testing.assert_close(back, flat, rtol=0, atol=1e-6)
        factors = unflatten(back, layout)
        assert factors["fc1"][0].shape == (4, 16) and factors["fc2"][1].shape == (5, 4)
        assert torch.equal(flatten(factors, layout), back)
    # each tensor of the normalised snapshots has mean 0 and std 1 over the pooled set (pooled mode)
    if mode == "pooled":
        normalised = torch.stack([normaliser.normalise(f) for f in flats])
        start = 0
        for size in layout.tensor_sizes:
            chunk = normalised[:, start : start + size]
            assert abs(float(chunk.mean())) < 1e-4 and abs(float(chunk.std(unbiased=False)) - 1) < 1e-3
            start += size


def test_adapter_round_trip_keeps_every_update(toy, tmp_path):
    world, layout, data, _, _ = toy
    flat = data[0].flats[-1]
    adapter = to_adapter(flat, layout, base_model=world.base_model)
    adapter.save_pretrained(tmp_path / "a")
    reloaded = load_adapter(tmp_path / "a")
    assert LoraLayout.of(reloaded) == layout
    for name, (a, b) in unflatten(flat, layout).items():
        torch.testing.assert_close(reloaded.delta(name), b @ a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(flatten(adapter_factors(reloaded), layout), flat, rtol=1e-5, atol=1e-6)


def test_decoded_lora_is_a_valid_peft_adapter(toy, tmp_path):
    from peft import PeftModel

    world, layout, data, queries, trained = toy
    normalised, condition, stats = trained.prepare(data[1].flats[-1], data[1].support)
    with torch.no_grad():
        mu, _ = trained.fvae.encode(normalised[None], condition[None])
        decoded = trained.normaliser.denormalise(trained.fvae.decode(mu, condition[None])[0], stats)
    to_adapter(decoded, layout, base_model=world.base_model).save_pretrained(tmp_path / "decoded")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = PeftModel.from_pretrained(world.module(), str(tmp_path / "decoded")).eval()
    x = queries[1].inputs["x"][:32]
    with torch.no_grad():
        ours = world.logits(data[1].task, unflatten(decoded, layout), {"x": x})
        theirs = peft_model(x)
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)


def test_meta_training_lowers_the_meta_loss(toy):
    world, layout, data, _, trained = toy
    untrained = meta_train(world, layout, data, MetaTrainConfig(steps=1, lr=1e-12, cpu=True, seed=0),
                           log=lambda line: None)
    before, after = evaluate_meta_loss(untrained, data, seed=3), evaluate_meta_loss(trained, data, seed=3)
    assert after < 0.5 * before, (before, after)
    # one entry per 50 steps, each the mean of its window, falling (measured: 0.437, 0.021, 0.0072)
    assert [entry["step"] for entry in trained.history] == [50, 100, 150]
    meta = [entry["meta_loss"] for entry in trained.history]
    assert meta[0] > meta[1] > meta[2] and meta[2] < 0.2 * meta[0], meta


def test_meta_training_resumes_from_a_checkpoint_to_the_same_weights(toy, tmp_path):
    world, layout, data, _, _ = toy
    config = MetaTrainConfig(steps=12, cpu=True, seed=5, checkpoint_every=6, log_every=6)
    straight = meta_train(world, layout, data, config, log=lambda line: None)
    meta_train(world, layout, data, MetaTrainConfig(**{**config.__dict__, "steps": 6}),
               checkpoint_dir=tmp_path, log=lambda line: None)
    lines: list[str] = []
    resumed = meta_train(world, layout, data, config, checkpoint_dir=tmp_path, log=lines.append)
    assert any("resumed" in line for line in lines)
    for (name, a), (_, b) in zip(straight.fvae.state_dict().items(), resumed.fvae.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)


def test_fusion_is_deterministic_under_a_seed_and_lowers_the_support_loss(toy):
    _, _, data, _, trained = toy
    flats = [d.flats[-1] for d in data]
    supports = [(d.task, d.support) for d in data]
    first = fuse(trained, flats, supports, FusionConfig(steps=30, seed=7))
    second = fuse(trained, flats, supports, FusionConfig(steps=30, seed=7))
    assert torch.equal(first.flat, second.flat) and first.weights == second.weights
    assert first.losses[-1] < first.losses[0]
    assert abs(sum(first.weights) - 1) < 1e-5


def test_ablations_change_the_fusion(toy):
    _, _, data, _, trained = toy
    flats = [d.flats[-1] for d in data]
    supports = [(d.task, d.support) for d in data]
    uniform = fuse(trained, flats, supports, FusionConfig(learn_weights=False))
    assert uniform.weights == [0.25] * N_TASKS and len(uniform.losses) == 1
    condition_only = fuse(trained, flats, supports, FusionConfig(condition_only=True))
    assert not torch.equal(uniform.flat, condition_only.flat)
    projected = fuse(trained, flats, supports, FusionConfig(steps=0))
    unprojected = fuse(trained, flats, supports, FusionConfig(steps=0, conflict_projection=False))
    assert unprojected.conflicts == 0
    # domain0's and domain3's latents conflict (test_conflict_projection_removes_…): both get projected
    assert projected.conflicts >= 2 and not torch.equal(projected.flat, unprojected.flat)


def latents(trained, flats, supports):
    """(μ, conditions, de-normalisation statistics) of each LoRA, as the F-VAE encodes it."""
    prepared = [trained.prepare(flat, batch) for flat, (_, batch) in zip(flats, supports)]
    conditions = torch.stack([p[1] for p in prepared])
    with torch.no_grad():
        mu, _ = trained.fvae.encode(torch.stack([p[0] for p in prepared]), conditions)
    return mu, conditions, [p[2] for p in prepared]


def test_conflict_projection_removes_the_conflict_of_latents_that_conflict(toy):
    # docs/icm.md step 2 (PCGrad, Yu et al., NeurIPS 2020): a direction uᵢ with uᵢ·uⱼ < 0 loses its component along
    # uⱼ, uᵢ − (uᵢ·uⱼ)·uⱼ, and is re-normalised. Of domains 0, 1 and 3 only 0 and 3 conflict, and projecting them
    # creates no new conflict with 1, so every order gives the same directions. With steps=0 the fusion decodes
    # z = mean(ρ)·normalize(mean(u)) with the mean condition (uniform w, δ = 0; fusion.py step 3). (With two tasks
    # and uniform weights the projection cannot show: normalize(p₀ + p₁) = normalize(u₀ + u₁).)
    from lora_fusion.icm.lora_io import weighted_stats

    _, _, data, _, trained = toy
    chosen = [data[0], data[1], data[3]]
    flats = [d.flats[-1] for d in chosen]
    supports = [(d.task, d.support) for d in chosen]
    mu, conditions, stats = latents(trained, flats, supports)
    u = torch.nn.functional.normalize(mu, dim=-1)
    dots = u @ u.T
    dot = float(dots[0, 2])
    assert dot < -0.1 and float(dots[0, 1]) > 0 and float(dots[1, 2]) > 0, dots  # measured: −0.74, 0.11, 0.29
    first, last = u[0] - dot * u[2], u[2] - dot * u[0]
    assert float(first @ u[1]) > 0 and float(last @ u[1]) > 0  # no new conflict: the order does not matter
    expected = torch.nn.functional.normalize(torch.stack([first, u[1], last]), dim=-1)
    assert abs(float(expected[0] @ u[2])) < 1e-6 and abs(float(expected[2] @ u[0])) < 1e-6  # the conflict is gone

    def decoded(directions: torch.Tensor) -> torch.Tensor:
        w = torch.full((3,), 1 / 3)
        z = (w @ mu.norm(dim=-1)) * torch.nn.functional.normalize(w @ directions, dim=0)
        with torch.no_grad():
            out = trained.fvae.decode(z[None], (w @ conditions)[None])[0]
        return trained.normaliser.denormalise(out, weighted_stats(stats, w))

    projected = fuse(trained, flats, supports, FusionConfig(steps=0))
    unprojected = fuse(trained, flats, supports, FusionConfig(steps=0, conflict_projection=False))
    assert projected.conflicts == 2 and unprojected.conflicts == 0
    with_projection, without = decoded(expected), decoded(u)
    gap = float((with_projection - without).norm())
    # small, as this decoder uses its latent little (test_latent_sensitivity_…): measured 6.6e-4 of the norm
    assert gap > 1e-4 * float(without.norm())
    assert float((projected.flat - with_projection).norm()) < 0.01 * gap
    assert float((unprojected.flat - without).norm()) < 0.01 * gap


def test_pcgrad_projection_removes_the_conflict_of_two_directions():
    u = torch.nn.functional.normalize(torch.tensor([[1.0, 0.2, 0.0], [-0.8, 1.0, 0.3]]), dim=-1)
    projected, count = project_conflicts(u, torch.Generator().manual_seed(0))
    assert count == 2
    assert abs(float(projected[0] @ u[1])) < 1e-6 and abs(float(projected[1] @ u[0])) < 1e-6
    torch.testing.assert_close(projected.norm(dim=-1), torch.ones(2))
    aligned = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [1.0, 1.0]]), dim=-1)
    same, none = project_conflicts(aligned, torch.Generator().manual_seed(0))
    assert none == 0
    torch.testing.assert_close(same, aligned)


def test_conv_fvae_shapes_and_learning():
    config = FVAEConfig(numel=1000, condition_dim=8, latent_dim=4, hidden_dim=32, architecture="conv", conv_stages=4)
    torch.manual_seed(0)
    model = FVAE(config)
    flat, condition = torch.randn(3, 1000), torch.randn(3, 8)
    mu, logvar = model.encode(flat, condition)
    assert mu.shape == logvar.shape == (3, 4)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        recon, mu, logvar = model(flat, condition)
        assert recon.shape == (3, 1000)
        loss = vae_loss(recon, flat, mu, logvar, config.beta)
        losses.append(float(loss.detach()))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert losses[-1] < losses[0]


# ------------------------------------------------------------------ API, CLI and bad input


@pytest.fixture(scope="module")
def saved(toy, tmp_path_factory):
    """The F-VAE on disk, the tasks' final LoRAs as PEFT adapters and a support file."""
    world, layout, data, _, trained = toy
    root = tmp_path_factory.mktemp("icm")
    trained.save(root / "fvae")
    adapters = []
    for item in data:
        path = root / "adapters" / item.task
        to_adapter(item.flats[-1], layout, base_model=world.base_model).save_pretrained(path)
        adapters.append(path)
    lines = [json.dumps({"task": d.task, "label": int(y), "x": x.tolist()})
             for d in data for x, y in zip(d.support.inputs["x"], d.support.labels)]
    (root / "support.jsonl").write_text("\n".join(lines) + "\n")
    return root, adapters


def test_icm_merge_is_deterministic_and_writes_a_loadable_adapter(saved, toy, tmp_path):
    root, paths = saved
    world, layout, _, _, _ = toy
    sources = [load_adapter(p) for p in paths]
    fused = icm_merge(sources, fvae=root / "fvae", support=root / "support.jsonl", seed=1, steps=20)
    again = icm_merge(sources, fvae=root / "fvae", support=root / "support.jsonl", seed=1, steps=20)
    assert fused.provenance["params"]["weights"] == again.provenance["params"]["weights"]
    fused.save_pretrained(tmp_path / "a")
    again.save_pretrained(tmp_path / "b")
    assert (tmp_path / "a" / "adapter_model.safetensors").read_bytes() == \
        (tmp_path / "b" / "adapter_model.safetensors").read_bytes()
    assert LoraLayout.of(load_adapter(tmp_path / "a")) == layout
    assert fused.provenance["params"]["tasks"] == [f"domain{i}" for i in range(N_TASKS)]


def test_fvae_directory_round_trips(saved, toy):
    root, _ = saved
    _, layout, data, _, trained = toy
    loaded = load_fvae(root / "fvae")
    assert loaded.layout == layout and loaded.base_model == trained.base_model
    normalised, condition, _ = loaded.prepare(data[0].flats[-1], data[0].support)
    with torch.no_grad():
        torch.testing.assert_close(loaded.fvae.encode(normalised[None], condition[None])[0],
                                   trained.fvae.encode(normalised[None], condition[None])[0])


def test_a_lora_of_another_shape_is_refused(saved, toy, tmp_path):
    root, paths = saved
    world, _, _, _, _ = toy
    other = toy_layout(world, rank=2)
    to_adapter(torch.zeros(other.numel), other, base_model=world.base_model).save_pretrained(tmp_path / "r2")
    sources = [load_adapter(p) for p in paths[:-1]] + [load_adapter(tmp_path / "r2")]
    with pytest.raises(LayoutMismatchError, match="rank 2"):
        icm_merge(sources, fvae=root / "fvae", support=root / "support.jsonl")


def test_a_support_label_the_fvae_does_not_know_is_refused(saved, tmp_path):
    root, paths = saved
    bad = tmp_path / "support.jsonl"
    bad.write_text(json.dumps({"task": "domain0", "label": "giraffe", "x": [0.0] * 16}) + "\n")
    with pytest.raises(UnknownSupportLabelError, match="giraffe"):
        icm_merge([load_adapter(p) for p in paths[:1]], fvae=root / "fvae", support=bad)


def test_an_fvae_of_another_base_model_is_refused(saved, toy, tmp_path):
    root, paths = saved
    _, layout, data, _, _ = toy
    to_adapter(data[0].flats[-1], layout, base_model="someone/else").save_pretrained(tmp_path / "other")
    sources = [load_adapter(tmp_path / "other")] + [load_adapter(p) for p in paths[1:]]
    with pytest.raises(BaseModelMismatchError, match="someone/else"):
        icm_merge(sources, fvae=root / "fvae", support=root / "support.jsonl")


def test_cli_fuse_and_info(saved, tmp_path):
    root, paths = saved
    runner = CliRunner()
    result = runner.invoke(icm_app, ["fuse", *map(str, paths), "--fvae", str(root / "fvae"),
                                     "--support", str(root / "support.jsonl"), "--out", str(tmp_path / "f"),
                                     "--steps", "5"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["tasks"] == [f"domain{i}" for i in range(N_TASKS)]
    assert load_adapter(tmp_path / "f").base_model == load_fvae(root / "fvae").base_model
    info = runner.invoke(icm_app, ["info", str(root / "fvae")])
    assert info.exit_code == 0 and json.loads(info.stdout)["lora_numel"] == 596


def test_merge_method_icm_through_the_main_cli(saved, tmp_path):
    from lora_fusion_cli.main import app

    root, paths = saved
    common = ["merge", *map(str, paths), "--method", "icm", "--fvae", str(root / "fvae"),
              "--support", str(root / "support.jsonl"), "--seed", "1"]
    result = CliRunner().invoke(app, [*common, "--out", str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    merged = load_adapter(tmp_path / "m")
    assert "icm" in (tmp_path / "m" / "README.md").read_text() and merged.base_model == load_fvae(root / "fvae").base_model
    refused = CliRunner().invoke(app, [*common, "--weights", ",".join(["1"] * len(paths)), "--out", str(tmp_path / "w")])
    assert refused.exit_code == 2 and "learns its own weights" in refused.stderr and not (tmp_path / "w").exists()
    missing = CliRunner().invoke(app, ["merge", *map(str, paths), "--method", "icm", "--out", str(tmp_path / "x")])
    assert missing.exit_code == 2 and "icm needs --fvae" in missing.stderr


@pytest.mark.parametrize("case", ["label", "fvae_dir"])
def test_cli_bad_input_exits_2_with_one_line(saved, tmp_path, case):
    root, paths = saved
    support, fvae = root / "support.jsonl", root / "fvae"
    if case == "label":
        support = tmp_path / "bad.jsonl"
        support.write_text(json.dumps({"task": "domain0", "label": 9, "x": [0.0] * 16}) + "\n")
    else:
        fvae = tmp_path
    result = CliRunner().invoke(icm_app, ["fuse", str(paths[0]), "--fvae", str(fvae), "--support", str(support),
                                          "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert result.stderr.startswith("Error:") and result.stderr.count("\n") == 1
    assert "Traceback" not in result.output
    with pytest.raises(FVAECheckpointError):
        load_fvae(tmp_path)


def test_importing_the_icm_package_and_cli_loads_no_torch():
    code = "import sys, lora_fusion.icm, lora_fusion_cli.icm; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_minilm_top_layer_cache_is_exact():
    from lora_fusion.icm.minilm import MiniLMTopLayerWorld

    world = MiniLMTopLayerWorld.load({"t": ("a", "b")})
    texts = ["a small domesticated carnivorous mammal", "move fast on foot", "of or relating to the sun"]
    assert world.check_cache_exact(texts) < 1e-5


def test_cli_train_then_fuse_on_minilm_at_tiny_scale(tmp_path):
    """The real path end to end (MiniLM, testbed texts, JSONL support of texts) at a scale of seconds."""
    recipe = tmp_path / "tiny.yaml"
    tiny = ("tasks: [noun_supersense, verb_supersense]\ntrain_per_task: [24, 24]\nsnapshots: [2, 1]\n"
            "support_k: 4\ntest_per_task: 8\nlora_steps: 10\nmeta: {steps: 3, log_every: 3}\n")
    recipe.write_text(tiny + f"data_dirs: {{wordnet: {json.dumps(str(WORDNET_SAMPLE))}}}\n")
    runner = CliRunner()
    trained = runner.invoke(icm_app, ["train", str(recipe), "--out", str(tmp_path / "run")])
    assert trained.exit_code == 0, trained.output
    adapters = [str(tmp_path / "run" / "adapters" / t) for t in ("noun_supersense", "verb_supersense")]
    fused = runner.invoke(icm_app, ["fuse", *adapters, "--fvae", str(tmp_path / "run" / "fvae"), "--support",
                                    str(tmp_path / "run" / "support.jsonl"), "--out", str(tmp_path / "f"),
                                    "--steps", "2"])
    assert fused.exit_code == 0, fused.output
    assert load_adapter(tmp_path / "f").base_model == "sentence-transformers/all-MiniLM-L6-v2"
    bad = runner.invoke(icm_app, ["train", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and bad.stderr.startswith("Error:")
    # data that is not there (an empty directory here; the wordnet-base package on a real machine): one line, exit 2
    recipe.write_text(tiny + f"data_dirs: {{wordnet: {json.dumps(str(tmp_path))}}}\n")
    missing = runner.invoke(icm_app, ["train", str(recipe), "--out", str(tmp_path / "y")])
    assert missing.exit_code == 2 and missing.stderr.startswith("Error: WordNet data file"), missing.output
    assert "apt-get install wordnet-base" in missing.stderr and "Traceback" not in missing.output
    recipe.write_text(tiny + "data_dirs: {imagenet: /data}\n")
    unknown = runner.invoke(icm_app, ["train", str(recipe), "--out", str(tmp_path / "z")])
    assert unknown.exit_code == 2 and "unknown data_dirs sources ['imagenet']" in unknown.stderr


def test_latent_sensitivity_is_zero_for_a_decoder_that_ignores_z(toy):
    from lora_fusion.icm.fusion import latent_sensitivity

    _, _, data, _, trained = toy
    flats, supports = [d.flats[-1] for d in data], [(d.task, d.support) for d in data]
    mu, conditions, _ = latents(trained, flats, supports)
    with torch.no_grad():  # ‖D([μ; v]) − D([0; v])‖ / ‖D([μ; v])‖ per LoRA, from the F-VAE directly
        with_latent = trained.fvae.decode(mu, conditions)
        expected = ((with_latent - trained.fvae.decode(torch.zeros_like(mu), conditions)).norm(dim=-1)
                    / with_latent.norm(dim=-1))
    sensitivity = latent_sensitivity(trained, flats, supports)
    assert sensitivity == pytest.approx(expected.tolist(), rel=1e-4)
    assert min(sensitivity) > 1e-5  # this decoder uses its latent, if little (measured: 5.6e-4 to 4.2e-3)
    first = trained.fvae.decoder_body[0]
    saved = first.weight.detach().clone()
    with torch.no_grad():
        first.weight[:, : trained.fvae.config.latent_dim] = 0  # the decoder now sees only the condition
    try:
        assert max(latent_sensitivity(trained, flats, supports)) < 1e-6
    finally:
        with torch.no_grad():
            first.weight.copy_(saved)


def test_a_diverging_meta_training_raises_instead_of_returning_nan(toy):
    from lora_fusion.icm.errors import TrainingDivergedError
    from lora_fusion.icm.worlds import ToyMLPWorld

    world, layout, data, _, _ = toy

    class NaNWorld(ToyMLPWorld):
        def loss(self, task, factors, batch):
            return super().loss(task, factors, batch) * float("nan")

    broken = NaNWorld(world.fc1, world.fc2, world.task_classes, base_model=world.base_model)
    with pytest.raises(TrainingDivergedError, match="step 1"):
        meta_train(broken, layout, data, MetaTrainConfig(steps=3, cpu=True), log=lambda line: None)


def test_posterior_log_variance_is_bounded():
    from lora_fusion.icm.fvae import LOGVAR_MAX

    model = FVAE(FVAEConfig(numel=50, condition_dim=3))
    _, logvar = model.encode(1e4 * torch.randn(2, 50), torch.randn(2, 3))
    assert float(logvar.detach().max()) <= LOGVAR_MAX


TWO_PROCESS_META = """
import json, os, sys, torch
from pathlib import Path
from lora_fusion.icm.meta import MetaTrainConfig, meta_train
from tests.test_icm import toy_data
torch.set_num_threads(1)
world, layout, data = toy_data()
trained = meta_train(world, layout, data, MetaTrainConfig(steps=60, meta_batch=3, cpu=True, log_every=60, seed=0), log=lambda line: None)
Path(sys.argv[1], f"rank{os.environ['RANK']}.json").write_text(json.dumps(trained.history[-1]))
"""


def toy_data():
    """A smaller toy world than the module fixture's, rebuilt identically in every launched process."""
    world, tasks = make_toy_world(n_tasks=N_TASKS, seed=0)
    layout = toy_layout(world)
    generator = torch.Generator().manual_seed(1)
    data = []
    for index, task in enumerate(tasks):
        train, support = task.sample(200, generator), task.sample(10, generator)
        _, snapshots = train_joint_lora(world, [(task.name, train)], layout, steps=60, seed=index, lr=1e-2,
                                        snapshots=3)
        data.append(TaskSnapshots(task.name, snapshots, support))
    return world, layout, data


def test_meta_training_on_two_processes_matches_one_process(tmp_path):
    # Each process takes its share of every meta-batch (2 and 1 snapshots of 3: uneven, so a wrong share weighting
    # would show); DDP averages the share-weighted gradients, so a step follows the meta-batch mean as on one process.
    # The reparameterisation noise of the shares differs, hence a tolerance.
    import os

    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    env.update(PYTHONPATH=str(Path(__file__).resolve().parent.parent), OMP_NUM_THREADS="1")
    script = tmp_path / "meta.py"
    script.write_text(TWO_PROCESS_META)
    torchrun = Path(sys.executable).with_name("torchrun")
    launched = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", str(script), str(tmp_path)],
                              capture_output=True, text=True, env=env, timeout=300)
    assert launched.returncode == 0, launched.stderr[-2000:]
    two = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    losses = [{key: entry[key] for key in ("loss", "meta_loss", "vae_loss")} for entry in two]
    assert len(losses) == 2 and losses[0] == losses[1]  # the logged losses are the meta-batch means, everywhere
    world, layout, data = toy_data()
    one = meta_train(world, layout, data, MetaTrainConfig(steps=60, meta_batch=3, cpu=True, log_every=60, seed=0),
                     log=lambda line: None).history[-1]
    # measured: 0.4197 vs 0.4177; without the share weighting the two-process run lands at 0.4286 (2.6 % off)
    assert two[0]["meta_loss"] == pytest.approx(one["meta_loss"], rel=0.015), (two[0], one)


def test_gradient_accumulation_of_two_half_meta_batches_equals_one_meta_batch(toy):
    # Without the inner loop a step is one forward pass, so two micro-batches of 2 snapshots draw the same snapshots
    # and noise as one meta-batch of 4; Accelerate halves each loss and updates once per pair.
    world, layout, data, _, _ = toy
    common = dict(cpu=True, seed=4, inner_steps=0, log_every=1000, max_grad_norm=0.0)
    whole = meta_train(world, layout, data, MetaTrainConfig(steps=6, meta_batch=4, **common), log=lambda line: None)
    halves = meta_train(world, layout, data, MetaTrainConfig(steps=12, meta_batch=2, gradient_accumulation=2, **common),
                        log=lambda line: None)
    for (name, a), (_, b) in zip(whole.fvae.state_dict().items(), halves.fvae.state_dict().items()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)


def test_accumulation_groups_must_end_with_the_run_and_at_checkpoints():
    with pytest.raises(InvalidParameterError, match="multiple of gradient_accumulation"):
        MetaTrainConfig(steps=3, gradient_accumulation=2)
    with pytest.raises(InvalidParameterError, match="checkpoint_every"):
        MetaTrainConfig(steps=8, checkpoint_every=3, gradient_accumulation=2)


def test_a_checkpoint_of_other_settings_is_refused_not_resumed(toy, tmp_path):
    world, layout, data, _, _ = toy
    meta_train(world, layout, data, MetaTrainConfig(steps=2, cpu=True, seed=5, checkpoint_every=2), checkpoint_dir=tmp_path,
               log=lambda line: None)
    with pytest.raises(FVAECheckpointError, match="other settings"):
        meta_train(world, layout, data, MetaTrainConfig(steps=4, cpu=True, seed=6, checkpoint_every=2),
                   checkpoint_dir=tmp_path, log=lambda line: None)
    with pytest.raises(FVAECheckpointError, match="other settings"):
        meta_train(world, layout, data, MetaTrainConfig(steps=4, cpu=True, seed=5, hidden_dim=32, checkpoint_every=2),
                   checkpoint_dir=tmp_path, log=lambda line: None)


# --- options against posterior collapse and the gates of a latent that matters (issue 17 §3, docs/icm.md) ---


def test_annealed_beta_starts_at_zero_and_reaches_beta():
    from lora_fusion.icm.fvae import annealed_beta

    assert annealed_beta(0.5, 1, 10) == 0.0
    assert annealed_beta(0.5, 6, 10) == pytest.approx(0.25)
    assert annealed_beta(0.5, 11, 10) == annealed_beta(0.5, 300, 10) == 0.5
    assert annealed_beta(0.5, 1, 0) == 0.5  # no warm-up: the constant β of ICM-LoRA


def test_meta_training_with_warmup_has_no_kl_at_the_first_step(toy):
    # β(1) = 0: one step with a warm-up is one step with β = 0, and differs from one step at the full β.
    world, layout, data, _, _ = toy
    common = dict(steps=1, cpu=True, seed=2, inner_steps=0, beta=5.0)
    warm = meta_train(world, layout, data, MetaTrainConfig(beta_warmup=0.5, **common), log=lambda line: None)
    zero = meta_train(world, layout, data, MetaTrainConfig(**{**common, "beta": 0.0}), log=lambda line: None)
    full = meta_train(world, layout, data, MetaTrainConfig(**common), log=lambda line: None)
    for (name, a), (_, b) in zip(warm.fvae.state_dict().items(), zero.fvae.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)
    assert not torch.equal(warm.fvae.to_mu.weight, full.fvae.to_mu.weight)


def test_free_bits_clamp_each_dimensions_kl():
    from lora_fusion.icm.fvae import kl_divergence, kl_per_dimension

    # per-dimension KL ½μ² (σ = 1): 0.125 and 2.0 nats
    mu = torch.tensor([[0.5, 2.0]], requires_grad=True)
    logvar = torch.zeros(1, 2)
    assert kl_per_dimension(mu, logvar).tolist() == pytest.approx([0.125, 2.0])
    assert float(kl_divergence(mu, logvar).detach()) == pytest.approx(2.125)
    clamped = kl_divergence(mu, logvar, free_bits=0.5)
    assert float(clamped.detach()) == pytest.approx(0.5 + 2.0)
    (grad,) = torch.autograd.grad(clamped, mu)
    assert grad[0].tolist() == pytest.approx([0.0, 2.0])  # below λ a dimension gets no KL gradient


def test_condition_dropout_replaces_conditions_at_the_set_rate_under_a_seed():
    from lora_fusion.icm.fvae import drop_conditions

    condition, null = torch.randn(4000, 3), torch.tensor([7.0, 8.0, 9.0])
    out, dropped = drop_conditions(condition, null, 0.3, torch.Generator().manual_seed(1))
    again, dropped_again = drop_conditions(condition, null, 0.3, torch.Generator().manual_seed(1))
    assert torch.equal(out, again) and torch.equal(dropped, dropped_again)
    assert abs(float(dropped.float().mean()) - 0.3) < 0.03
    assert torch.equal(out[dropped], null.expand(int(dropped.sum()), 3))
    assert torch.equal(out[~dropped], condition[~dropped])
    # the F-VAE drops in training only: in eval mode (fusion, gates) the condition is always used
    model = FVAE(FVAEConfig(numel=20, condition_dim=3, latent_dim=2, hidden_dim=8, condition_dropout=0.5))
    flat, conditions = torch.randn(64, 20), torch.randn(64, 3)
    model.eval()
    mu_eval, _ = model.encode(flat, conditions)
    with torch.no_grad():
        _, mu_forward, _ = model(flat, conditions, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(mu_forward, mu_eval)
    model.train()
    with torch.no_grad():
        _, mu_train, _ = model(flat, conditions, generator=torch.Generator().manual_seed(0))
        _, expected_dropped = drop_conditions(conditions, model.null_condition, 0.5, torch.Generator().manual_seed(0))
    changed = (mu_train - mu_eval).abs().sum(-1) > 1e-6
    assert torch.equal(changed, expected_dropped) and 0 < int(changed.sum()) < 64
    assert "null_condition" not in FVAE(FVAEConfig(numel=20, condition_dim=3)).state_dict()  # default unchanged


def test_a_decoder_without_the_condition_ignores_it_and_a_narrow_decoder_is_smaller():
    from lora_fusion.icm.fvae import count_parameters

    model = FVAE(FVAEConfig(numel=30, condition_dim=5, latent_dim=4, hidden_dim=32, decoder_condition=False))
    z = torch.randn(3, 4)
    torch.testing.assert_close(model.decode(z, torch.randn(3, 5)), model.decode(z, torch.randn(3, 5)))
    wide = FVAE(FVAEConfig(numel=30, condition_dim=5, latent_dim=4, hidden_dim=32))
    narrow = FVAE(FVAEConfig(numel=30, condition_dim=5, latent_dim=4, hidden_dim=32, decoder_hidden_dim=8))
    assert count_parameters(narrow.decoder_body) < count_parameters(wide.decoder_body) / 3
    assert count_parameters(narrow) - count_parameters(narrow.decoder_body) == \
        count_parameters(wide) - count_parameters(wide.decoder_body)  # the encoder keeps its width
    with pytest.raises(InvalidParameterError, match="decoder_hidden_dim"):
        FVAEConfig(numel=30, condition_dim=5, architecture="conv", conv_stages=2, decoder_hidden_dim=8)


def test_weight_decay_shrinks_the_decoder_only():
    from lora_fusion.icm.meta import make_optimizer

    model = FVAE(FVAEConfig(numel=30, condition_dim=5, latent_dim=4, hidden_dim=16))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = make_optimizer(model, MetaTrainConfig(weight_decay=0.5, lr=0.1))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # no loss gradient: any change is the decay
    optimizer.step()
    for name, value in model.state_dict().items():
        if name.startswith("decoder_body."):
            torch.testing.assert_close(value, before[name] * (1 - 0.1 * 0.5), msg=name)
        else:
            assert torch.equal(value, before[name]), name
    assert isinstance(make_optimizer(model, MetaTrainConfig()), torch.optim.Adam)  # default: ICM-LoRA's Adam


def test_denoising_noises_the_encoder_input_only(toy, monkeypatch):
    import lora_fusion.icm.meta as meta

    world, layout, data, _, _ = toy
    seen: dict[str, list[torch.Tensor]] = {"input": [], "target": []}
    forward, loss = FVAE.forward, meta.vae_loss
    monkeypatch.setattr(FVAE, "forward", lambda self, flat, condition, **kw: (
        seen["input"].append(flat.detach().clone()) or forward(self, flat, condition, **kw)))
    monkeypatch.setattr(meta, "vae_loss", lambda recon, target, *rest: (
        seen["target"].append(target.detach().clone()) or loss(recon, target, *rest)))
    trained = meta_train(world, layout, data, MetaTrainConfig(steps=20, cpu=True, inner_steps=0, meta_batch=8,
                                                              denoise_std=0.5), log=lambda line: None)
    clean = torch.stack([trained.normaliser.normalise(f) for d in data for f in d.flats])
    for source, target in zip(seen["input"], seen["target"]):
        # the target is a clean snapshot; the input is that snapshot plus N(0, 0.5²) noise
        assert all(bool((clean == row).all(-1).any()) for row in target)
        assert float((source - target).std()) == pytest.approx(0.5, rel=0.05)


def test_diverse_loras_are_seeded_and_include_multitask_loras(toy):
    from lora_fusion.icm.diversity import DiversityConfig, train_diverse_loras

    world, layout, data, _, _ = toy
    train = {d.task: d.support for d in data}  # small data sets keep the test fast; any batch would do
    support = {d.task: d.support for d in data}
    config = DiversityConfig(seeds=1, subsets=1, multitask=2, snapshots=3, subset_fraction=0.5)
    extra = train_diverse_loras(world, layout, train, support, config, steps=9, lr=1e-2, seed=0, log=lambda l: None)
    again = train_diverse_loras(world, layout, train, support, config, steps=9, lr=1e-2, seed=0, log=lambda l: None)
    other = train_diverse_loras(world, layout, train, support, config, steps=9, lr=1e-2, seed=0, salt="heldout",
                                log=lambda l: None)
    assert len(extra) == 2 * N_TASKS + 2 and all(item.flats.shape == (3, layout.numel) for item in extra)
    assert all(torch.equal(a.flats, b.flats) for a, b in zip(extra, again))
    assert not any(torch.equal(a.flats, b.flats) for a, b in zip(extra, other))
    multitask = [item for item in extra if item.members]
    assert len(multitask) == 2 and all(len(item.members) >= 2 for item in multitask)
    assert all(item.task == "+".join(t for t, _ in item.members) for item in multitask)
    assert len(multitask[0].support) == sum(len(b) for _, b in multitask[0].members)
    # a multi-task LoRA's inner-loop objective is the sum of its tasks' losses, and meta-training takes it
    trained = meta_train(world, layout, list(data) + extra, MetaTrainConfig(steps=4, cpu=True, inner_steps=1),
                         log=lambda line: None)
    assert math.isfinite(trained.history[-1]["loss"])


def test_unit_sensitivity_is_zero_for_a_decoder_that_ignores_z(toy):
    from lora_fusion.icm.gates import unit_latent_sensitivity

    _, _, data, _, trained = toy
    flats, supports = [d.flats[-1] for d in data], [d.support for d in data]
    sensitivity = unit_latent_sensitivity(trained, flats, supports)
    assert min(sensitivity) > 1e-4 and sensitivity == unit_latent_sensitivity(trained, flats, supports)
    first = trained.fvae.decoder_body[0]
    saved = first.weight.detach().clone()
    with torch.no_grad():
        first.weight[:, : trained.fvae.config.latent_dim] = 0
    try:
        # 0 up to float rounding (a batch of moved latents and a single one take different kernels): measured 1.6e-7
        assert max(unit_latent_sensitivity(trained, flats, supports)) < 1e-6
    finally:
        with torch.no_grad():
            first.weight.copy_(saved)


def test_probe_accuracy_is_one_for_separable_latents_and_chance_for_identical_ones():
    from lora_fusion.icm.gates import probe_accuracy

    generator = torch.Generator().manual_seed(0)
    centres = 5 * torch.randn(4, 16, generator=generator)
    labels = [f"task{i}" for i in range(4) for _ in range(6)]
    mu = centres.repeat_interleave(6, 0) + 0.1 * torch.randn(24, 16, generator=generator)
    held = centres.repeat_interleave(2, 0) + 0.1 * torch.randn(8, 16, generator=generator)
    held_labels = [f"task{i}" for i in range(4) for _ in range(2)]
    assert probe_accuracy(mu, labels, held, held_labels) == 1.0
    assert probe_accuracy(torch.zeros(24, 16), labels, torch.zeros(8, 16), held_labels) == 0.25
    # more features than rows (flat LoRAs): the dual form of the same ridge fit
    wide = 5 * torch.randn(4, 500, generator=generator)
    assert probe_accuracy(wide.repeat_interleave(6, 0) + torch.randn(24, 500, generator=generator), labels,
                          wide.repeat_interleave(2, 0) + torch.randn(8, 500, generator=generator), held_labels) == 1.0


def test_recipe_reads_the_diversity_block_and_refuses_unknown_keys():
    from lora_fusion.errors import RecipeError
    from lora_fusion.icm.diversity import DiversityConfig
    from lora_fusion.icm.pipeline import ICMRecipe

    recipe = ICMRecipe.from_mapping({"diversity": {"seeds": 2, "multitask": 3},
                                     "meta": {"free_bits": 0.25, "beta_warmup": 0.3, "condition_dropout": 0.5}})
    assert recipe.diversity == DiversityConfig(seeds=2, multitask=3) and recipe.diversity.enabled
    assert recipe.meta.free_bits == 0.25 and not ICMRecipe().diversity.enabled
    with pytest.raises(RecipeError, match="unknown diversity keys"):
        ICMRecipe.from_mapping({"diversity": {"sedes": 2}})
    with pytest.raises(InvalidParameterError, match="beta_warmup"):
        MetaTrainConfig(beta_warmup=1.5)


def test_canonical_factors_keep_the_update_and_forget_the_factorisation(toy):
    from lora_fusion.icm.lora_io import canonical_factors, canonical_flat

    world, layout, data, _, _ = toy
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 30, generator=generator), torch.randn(20, 4, generator=generator)
    mixing = torch.randn(4, 4, generator=generator) + 4 * torch.eye(4)
    canonical = canonical_factors(a, b)
    torch.testing.assert_close(canonical[1] @ canonical[0], b @ a, atol=1e-5, rtol=1e-5)
    # B·A = (B·R)(R⁻¹·A): the canonical factors of both are the same
    for mine, theirs in zip(canonical, canonical_factors(torch.linalg.solve(mixing, a), b @ mixing)):
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-4)
    # an F-VAE trained on canonical factors sees a re-factorised LoRA exactly as the original
    trained = meta_train(world, layout, data, MetaTrainConfig(steps=3, cpu=True, inner_steps=0, factor_form="canonical"),
                         log=lambda line: None)
    flat = data[0].flats[-1]
    mixed = {name: (torch.linalg.solve(mixing, fa), fb @ mixing) for name, (fa, fb) in unflatten(flat, layout).items()}
    original, condition, _ = trained.prepare(flat, data[0].support)
    refactored, condition_again, _ = trained.prepare(flatten(mixed, layout), data[0].support)
    torch.testing.assert_close(refactored, original, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(condition_again, condition, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(canonical_flat(flat, layout), flat)
