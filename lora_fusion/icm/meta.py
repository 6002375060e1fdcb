"""Meta-training of the F-VAE: ICM-Fusion's Algorithm 1, first-order, run by Accelerate; and the trained bundle.

For each snapshot lᵢ of a meta-batch (docs/icm.md; Shao et al., AAAI 2026, arXiv:2508.04153, Algorithm 1 as
paraphrased in docs/icm.md):

1. (μᵢ, log σᵢ²) = E([lᵢ; vᵢ]); zᵢ = μᵢ + σᵢ·ε; lᵢ⁰ = D([zᵢ; vᵢ]).
2. K inner steps on the decoded LoRA with the task's support data (Eq. 8):
   lᵢ^{k+1} = lᵢ^k − β·∇_l L_task(denormalise(lᵢ^k); Dᵢ); lᵢ^K is detached (first-order).
3. Re-encode and decode: l̂ᵢ = D([z̃ᵢ; vᵢ]) with z̃ᵢ ~ N(E([lᵢ^K; vᵢ])).
4. L_meta,i = MSE(l̂ᵢ, lᵢ) + λ_KL·KL(N(μ̃ᵢ, σ̃ᵢ²) ‖ N(0, I)), plus the first pass's own VAE loss with weight
   `first_pass_weight` (an interpretation: under the first-order approximation step 1 gets no gradient otherwise).
5. One Adam step on encoder and decoder over the mean of L_meta,i.

Options against posterior collapse (docs/icm.md, "A latent that matters"; all off by default): condition dropout,
a decoder without the condition and a narrower decoder (F-VAE options, `lora_fusion.icm.fvae`); `free_bits` λ per
latent dimension (Kingma et al. 2016) and β annealed linearly from 0 over the first `beta_warmup` fraction of the
steps (Bowman et al. 2016), both in every KL term; decoupled weight decay on the decoder (AdamW, Loshchilov & Hutter,
ICLR 2019); denoising (Vincent et al., ICML 2008): the first pass encodes l + σ·ε, ε ~ N(0, I) in normalised units,
and still reconstructs the clean l (the second pass's input, l^K, is left as it is); `factor_form="canonical"`
(ours): every LoRA, in training and in fusion, enters as the balanced SVD factors of its updates
(`lora_io.canonical_factors`), so that LoRAs of one update but different seeds look alike.

K = 0 is the `no-meta` ablation: ICM-LoRA's plain CVAE training. Snapshots are drawn uniformly from the pooled set of
all tasks' checkpoints (a data loader over the weight data set), so a task that contributes more checkpoints is seen
more often: the long-tailed setting of the paper.

Accelerate owns the device, mixed precision and data parallelism (`Accelerator.prepare`, `backward`, `autocast`).
Checkpoints (`checkpoints/step-N/`, the newest kept) hold the F-VAE weights, the optimizer state and the sampler's RNG
state, so an interrupted run resumes where it stopped and ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from lora_fusion.errors import InvalidParameterError

from .errors import FVAECheckpointError, TrainingDivergedError
from .fvae import FVAE, FVAEConfig, annealed_beta, vae_loss
from .lora_io import LoraLayout, Normalisation, Normaliser, TensorStats, canonical_flat, unflatten
from .task_vectors import TASK_VECTOR_MODES, TaskVectorMode, task_vector, weight_delta_projection
from .worlds import Batch, TaskWorld, restore_world

FORMAT_VERSION = 1
CONFIG_NAME = "icm_config.json"
WEIGHTS_NAME = "fvae.safetensors"
TENSORS_NAME = "icm_tensors.safetensors"


@dataclass(frozen=True)
class TaskSnapshots:
    """One task's training data for the F-VAE: its LoRA checkpoints (raw flat vectors) and its support set.

    A LoRA trained jointly on several tasks lists them in `members` ((task, support) pairs): its inner-loop loss is
    the sum of theirs, and `support` (the union of their support sets) gives its task vector.
    """

    task: str
    flats: torch.Tensor
    support: Batch
    members: tuple[tuple[str, Batch], ...] = ()

    def __post_init__(self) -> None:
        if self.flats.ndim != 2 or self.flats.shape[0] < 1:
            raise InvalidParameterError("flats", tuple(self.flats.shape), expected="M×D with M ≥ 1 snapshots")

    @property
    def objective(self) -> tuple[tuple[str, Batch], ...]:
        """The (task, support) terms of this LoRA's task loss: its members, or its own task."""
        return self.members or ((self.task, self.support),)


@dataclass(frozen=True)
class MetaTrainConfig:
    """Algorithm 1's hyper-parameters (defaults: docs/icm.md) and the F-VAE's shape."""

    steps: int = field(default=1000, metadata={"help": "Outer steps (micro-steps under gradient accumulation)."})
    meta_batch: int = field(default=4, metadata={"help": "Snapshots per outer step."})
    gradient_accumulation: int = field(
        default=1, metadata={"help": "Outer steps whose gradients add up to one Adam update (Accelerate)."}
    )
    inner_steps: int = field(default=2, metadata={"help": "K, Eq. 8 steps on the decoded LoRA; 0 = no-meta."})
    inner_lr: float = field(default=0.05, metadata={"help": "β of Eq. 8, in normalised units."})
    lr: float = field(default=1e-3, metadata={"help": "Outer Adam learning rate γ."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Clip the outer gradient's norm (0: no clipping)."})
    first_pass_weight: float = field(default=1.0, metadata={"help": "Weight of the first pass's VAE loss."})
    task_vectors: TaskVectorMode = field(default="in_context", metadata={"help": "in_context, base, weight_delta."})
    normalisation: Normalisation = field(default="pooled", metadata={"help": "pooled or per_checkpoint."})
    latent_dim: int = field(default=16, metadata={"help": "F-VAE latent size."})
    hidden_dim: int = field(default=256, metadata={"help": "F-VAE hidden width."})
    beta: float = field(default=0.005, metadata={"help": "KL weight λ_KL."})
    beta_warmup: float = field(
        default=0.0, metadata={"help": "Fraction of the steps over which β rises linearly from 0 (0: constant)."}
    )
    free_bits: float = field(default=0.0, metadata={"help": "λ nats per latent dimension that the KL leaves free."})
    condition_dropout: float = field(default=0.0, metadata={"help": "p of replacing v by a learned null vector."})
    decoder_condition: bool = field(default=True, metadata={"help": "False: a decoder D(z) without the task vector."})
    decoder_hidden_dim: int | None = field(default=None, metadata={"help": "Decoder width (None: hidden_dim)."})
    weight_decay: float = field(default=0.0, metadata={"help": "Decoupled (AdamW) weight decay of the decoder."})
    denoise_std: float = field(default=0.0, metadata={"help": "σ of the noise added to the first pass's input."})
    factor_form: str = field(
        default="raw", metadata={"help": "raw: the LoRA's own factors; canonical: balanced SVD factors of each ΔW."}
    )
    architecture: str = field(default="auto", metadata={"help": "F-VAE body: auto, mlp or conv."})
    seed: int = field(default=0, metadata={"help": "Seeds the F-VAE's initialisation, sampling and noise."})
    checkpoint_every: int = field(default=0, metadata={"help": "Save a resumable checkpoint every N steps (0: off)."})
    mixed_precision: str | None = field(
        default=None, metadata={"help": "no, fp16 or bf16; None: the launcher's (`accelerate launch --mixed_precision`)."}
    )
    cpu: bool = field(default=False, metadata={"help": "Force the CPU even when an accelerator is present."})
    log_every: int = field(default=50, metadata={"help": "Log the mean loss every N steps."})

    def __post_init__(self) -> None:
        for name in ("steps", "meta_batch", "gradient_accumulation"):
            if getattr(self, name) < 1:
                raise InvalidParameterError(name, getattr(self, name), expected="a positive integer")
        # A group of accumulated steps must end before the run and before each checkpoint: a checkpoint does not hold
        # half-summed gradients, and a last partial group would never be applied.
        for name in ("steps", "checkpoint_every"):
            if getattr(self, name) % self.gradient_accumulation:
                raise InvalidParameterError(
                    name, getattr(self, name), expected=f"a multiple of gradient_accumulation ({self.gradient_accumulation})"
                )
        if self.inner_steps < 0:
            raise InvalidParameterError("inner_steps", self.inner_steps, expected="K ≥ 0 (0 = no-meta)")
        if self.task_vectors not in TASK_VECTOR_MODES:
            raise InvalidParameterError("task_vectors", self.task_vectors, expected=f"one of {TASK_VECTOR_MODES}")
        if self.normalisation not in ("pooled", "per_checkpoint"):
            raise InvalidParameterError("normalisation", self.normalisation, expected="'pooled' or 'per_checkpoint'")
        if not 0 <= self.beta_warmup <= 1:
            raise InvalidParameterError("beta_warmup", self.beta_warmup, expected="a fraction of the steps, 0 … 1")
        for name in ("free_bits", "weight_decay", "denoise_std"):
            if getattr(self, name) < 0:
                raise InvalidParameterError(name, getattr(self, name), expected="a number ≥ 0")
        if self.factor_form not in ("raw", "canonical"):
            raise InvalidParameterError("factor_form", self.factor_form, expected="'raw' or 'canonical'")
        if self.mixed_precision not in (None, "no", "fp16", "bf16"):
            raise InvalidParameterError("mixed_precision", self.mixed_precision, expected="'no', 'fp16' or 'bf16'")


@dataclass
class TrainedFVAE:
    """Everything fusion needs: the F-VAE, the layout and normaliser, the world (base model, heads, tasks) and how
    task vectors are made. Saved as a directory by [`save`], read back by [`load_fvae`]."""

    fvae: FVAE
    layout: LoraLayout
    normaliser: Normaliser
    world: TaskWorld
    config: MetaTrainConfig
    history: list[dict[str, float]] = field(default_factory=list)

    @property
    def base_model(self) -> str:
        return self.world.base_model

    def projection(self) -> torch.Tensor | None:
        """The fixed projection of `weight_delta` task vectors, else None."""
        if self.config.task_vectors != "weight_delta":
            return None
        return weight_delta_projection(self.layout.numel, self.world.condition_dim)

    def prepare(self, raw_flat: torch.Tensor, support: Batch) -> tuple[torch.Tensor, torch.Tensor, TensorStats]:
        """(normalised l, task vector v, the statistics that de-normalise it) of one raw flat LoRA (first put in
        canonical factors when the F-VAE was trained on them)."""
        if self.config.factor_form == "canonical":
            raw_flat = canonical_flat(raw_flat, self.layout)
        stats = self.normaliser.stats_of(raw_flat)
        normalised = self.normaliser.normalise(raw_flat)
        vector = task_vector(self.config.task_vectors, self.world, factors=unflatten(raw_flat, self.layout),
                             normalised_flat=normalised, support=support, projection=self.projection())
        return normalised, vector, stats

    def save(self, directory: str | Path) -> Path:
        """Write `icm_config.json`, `fvae.safetensors` and `icm_tensors.safetensors` into `directory`, atomically."""
        from safetensors.torch import save_file

        from lora_fusion import __version__

        out = Path(directory).expanduser().absolute()
        stage = out.with_name(f".{out.name}.incomplete")
        shutil.rmtree(stage, ignore_errors=True)
        stage.mkdir(parents=True)
        try:
            weights = {k: v.detach().cpu().contiguous() for k, v in self.fvae.state_dict().items()}
            save_file(weights, str(stage / WEIGHTS_NAME))
            tensors = {"normaliser.mean": self.normaliser.pooled.mean, "normaliser.std": self.normaliser.pooled.std}
            tensors |= {f"world.{k}": v.cpu() for k, v in self.world.tensors().items()}
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(stage / TENSORS_NAME))
            record = {
                "format": FORMAT_VERSION,
                "method": "icm",
                "lora_fusion_version": __version__,
                "base_model": self.base_model,
                "layout": self.layout.to_dict(),
                "fvae": self.fvae.config.to_dict(),
                "normalisation": self.normaliser.mode,
                "meta_training": asdict(self.config),
                "world": self.world.config(),
                "history": self.history,
            }
            (stage / CONFIG_NAME).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
            if out.exists():
                shutil.rmtree(out)
            stage.rename(out)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        return out


def load_fvae(directory: str | Path, *, world: TaskWorld | None = None) -> TrainedFVAE:
    """Read an F-VAE directory written by [`TrainedFVAE.save`]; `world` reuses an already built world.

    Raises:
        FVAECheckpointError: the directory is missing, incomplete or of an unknown format.
    """
    from safetensors.torch import load_file

    path = Path(directory).expanduser()
    files = [path / name for name in (CONFIG_NAME, WEIGHTS_NAME, TENSORS_NAME)]
    if not all(f.is_file() for f in files):
        raise FVAECheckpointError(
            f"{path} is not an F-VAE directory (needs {CONFIG_NAME}, {WEIGHTS_NAME}, {TENSORS_NAME}); "
            "create one with `lora-fusion icm train`."
        )
    try:
        record = json.loads(files[0].read_text())
        version = record.get("format")
    except (json.JSONDecodeError, AttributeError) as err:
        raise FVAECheckpointError(
            f"{files[0]} is not valid JSON ({err}); retrain with `lora-fusion icm train`."
        ) from None
    if version != FORMAT_VERSION:
        raise FVAECheckpointError(f"{path}: F-VAE format {version!r}, this lora-fusion reads {FORMAT_VERSION}; "
                                  "upgrade lora-fusion or retrain the F-VAE.")
    tensors = load_file(str(files[2]))
    config = MetaTrainConfig(**record["meta_training"])
    fvae = FVAE(FVAEConfig(**record["fvae"]))
    fvae.load_state_dict(load_file(str(files[1])))
    fvae.eval()
    layout = LoraLayout.from_dict(record["layout"])
    normaliser = Normaliser(layout, record["normalisation"], TensorStats(tensors["normaliser.mean"],
                                                                         tensors["normaliser.std"]))
    if world is None:
        world = restore_world(record["world"], {k[6:]: v for k, v in tensors.items() if k.startswith("world.")})
    return TrainedFVAE(fvae, layout, normaliser, world, config, record.get("history", []))


def meta_train(
    world: TaskWorld,
    layout: LoraLayout,
    data: Sequence[TaskSnapshots],
    config: MetaTrainConfig,
    *,
    checkpoint_dir: str | Path | None = None,
    log: Callable[[str], None] = print,
) -> TrainedFVAE:
    """Train an F-VAE on the snapshots of several tasks with Algorithm 1 (see the module docstring).

    Args:
        world: the base model and tasks; gives L_task for the inner loop and the in-context task vectors.
        layout: the modules, shapes and ranks of every snapshot (see [`LoraLayout.of`]).
        data: per task, its raw flat checkpoints (M_t×D, uneven M_t allowed) and its support set.
        config: hyper-parameters; `inner_steps=0` is the no-meta ablation.
        checkpoint_dir: where resumable checkpoints go (every `config.checkpoint_every` steps); a run finds the
            latest one there and continues from it.
        log: receives one progress line every `config.log_every` steps.

    Returns:
        The trained [`TrainedFVAE`] (on the CPU, in eval mode) with its loss history.

    Raises:
        TrainingDivergedError: a step's loss is NaN or infinite (nothing is returned; checkpoints stay as they were).
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    accelerator = Accelerator(cpu=config.cpu, mixed_precision=config.mixed_precision,
                              gradient_accumulation_steps=config.gradient_accumulation)
    set_seed(config.seed)
    device = accelerator.device
    world.to(device)

    flats = torch.cat([d.flats.float() for d in data])
    if config.factor_form == "canonical":
        flats = torch.stack([canonical_flat(f, layout) for f in flats])
    normaliser = Normaliser.fit(flats, layout, config.normalisation)
    snapshot_task = [i for i, d in enumerate(data) for _ in range(d.flats.shape[0])]
    stats = [normaliser.stats_of(f) for f in flats]
    targets = torch.stack([normaliser.normalise(f) for f in flats])
    projection = weight_delta_projection(layout.numel, world.condition_dim) if config.task_vectors == "weight_delta" \
        else None
    supports = [d.support.to(device) for d in data]
    objectives = [tuple((task, batch.to(device)) for task, batch in d.objective) for d in data]
    conditions = torch.stack([
        task_vector(config.task_vectors, world, factors=unflatten(flats[j].to(device), layout),
                    normalised_flat=targets[j], support=supports[snapshot_task[j]], projection=projection).cpu()
        for j in range(len(flats))
    ])

    fvae = FVAE(FVAEConfig(numel=layout.numel, condition_dim=world.condition_dim, latent_dim=config.latent_dim,
                           hidden_dim=config.hidden_dim, beta=config.beta, architecture=config.architecture,
                           condition_dropout=config.condition_dropout, decoder_condition=config.decoder_condition,
                           decoder_hidden_dim=config.decoder_hidden_dim))
    optimizer = make_optimizer(fvae, config)
    model, optimizer = accelerator.prepare(fvae, optimizer)
    sampler = torch.Generator().manual_seed(config.seed)
    noise = torch.Generator(device=device).manual_seed(config.seed + 1)
    history: list[dict[str, float]] = []
    start_step = 0
    checkpoints = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if checkpoints is not None:
        start_step, history = _resume(checkpoints, accelerator, model, optimizer, sampler, noise, _identity(config))
        if start_step:
            log(f"resumed from {checkpoints / f'step-{start_step}'}")

    targets, conditions = targets.to(device), conditions.to(device)
    started, window = time.perf_counter(), []
    model.train()
    if config.meta_batch < accelerator.num_processes:
        raise InvalidParameterError(
            "meta_batch", config.meta_batch,
            expected=f"at least the number of processes ({accelerator.num_processes}), or launch fewer processes",
        )
    warmup_steps = math.ceil(config.beta_warmup * config.steps)  # a positive fraction warms up for ≥ 1 step
    for step in range(start_step + 1, config.steps + 1):
        beta = annealed_beta(config.beta, step, warmup_steps)
        picked = torch.randint(len(targets), (config.meta_batch,), generator=sampler).tolist()
        # Data parallel: every process draws the same meta-batch and takes every N-th task of it. Its mean losses
        # are weighted by its share × N, so DDP's average of the gradients is the gradient of the meta-batch mean.
        mine = picked[accelerator.process_index :: accelerator.num_processes]
        share = len(mine) / len(picked)
        with accelerator.accumulate(model):
            target, condition = targets[mine], conditions[mine]
            source = target + config.denoise_std * torch.randn(target.shape, generator=noise, device=device) \
                if config.denoise_std else target
            with accelerator.autocast():
                recon, mu, logvar = model(source, condition, generator=noise)
                first = vae_loss(recon.float(), target, mu.float(), logvar.float(), beta, config.free_bits)
            if config.inner_steps:
                adapted = torch.stack([
                    inner_loop(world, layout, normaliser, recon[i].detach().float(), stats[j],
                               objectives[snapshot_task[j]], config.inner_steps, config.inner_lr)
                    for i, j in enumerate(mine)
                ])
                with accelerator.autocast():
                    recon2, mu2, logvar2 = model(adapted, condition, generator=noise)
                    meta = vae_loss(recon2.float(), target, mu2.float(), logvar2.float(), beta, config.free_bits)
                loss = meta + config.first_pass_weight * first
            else:
                meta, loss = first, first
            # the meta-batch means, identical in every process (the sum over processes of share-weighted means)
            losses = accelerator.reduce(torch.stack([loss, meta, first]).detach() * share, reduction="sum")
            if not torch.isfinite(losses[0]):
                raise TrainingDivergedError(
                    f"F-VAE meta-training diverged at step {step} (loss {float(losses[0]):.3g}); lower `lr` or "
                    f"`inner_lr`, or raise the KL weight `beta` (it is {beta} at this step)."
                )
            # Under gradient accumulation Accelerate divides the loss, and the prepared optimizer only updates (and
            # zeroes) on every `gradient_accumulation`-th step; clipping applies to the summed gradient then.
            accelerator.backward(loss * share * accelerator.num_processes)
            if config.max_grad_norm and accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad()
        window.append(tuple(float(value) for value in losses))
        if step % config.log_every == 0 or step == config.steps:
            mean = [sum(v) / len(window) for v in zip(*window)]
            history.append({"step": step, "loss": mean[0], "meta_loss": mean[1], "vae_loss": mean[2],
                            "seconds": round(time.perf_counter() - started, 2)})
            log(f"step {step}/{config.steps} loss {mean[0]:.4f} meta {mean[1]:.4f} vae {mean[2]:.4f}")
            window = []
        if checkpoints is not None and config.checkpoint_every and step % config.checkpoint_every == 0:
            _save_checkpoint(checkpoints, step, accelerator, model, optimizer, sampler, noise, history,
                             _identity(config))

    fvae = accelerator.unwrap_model(model).cpu().eval()
    world.to("cpu")
    return TrainedFVAE(fvae, layout, normaliser, world, config, history)


def make_optimizer(fvae: FVAE, config: MetaTrainConfig) -> torch.optim.Optimizer:
    """Adam over the F-VAE (ICM-LoRA's optimiser); with `weight_decay` > 0, AdamW whose decay (Loshchilov & Hutter,
    ICLR 2019) acts on the decoder only: the option shrinks the decoder, the encoder stays as it was."""
    if not config.weight_decay:
        return torch.optim.Adam(fvae.parameters(), lr=config.lr)
    decoder = list(fvae.decoder_body.parameters())
    chosen = {id(p) for p in decoder}
    rest = [p for p in fvae.parameters() if id(p) not in chosen]
    return torch.optim.AdamW([{"params": rest, "weight_decay": 0.0},
                              {"params": decoder, "weight_decay": config.weight_decay}], lr=config.lr)


def inner_loop(
    world: TaskWorld,
    layout: LoraLayout,
    normaliser: Normaliser,
    start: torch.Tensor,
    stats: TensorStats,
    objective: Sequence[tuple[str, Batch]],
    steps: int,
    lr: float,
) -> torch.Tensor:
    """Eq. 8: K steps lᵏ⁺¹ = lᵏ − β·∇_l L_task(denormalise(lᵏ); D) on a normalised flat LoRA; returns l^K detached.
    L_task is the sum over the (task, support) terms of `objective` (one term for a single-task LoRA)."""
    current = start.detach()
    for _ in range(steps):
        current = current.requires_grad_(True)
        factors = unflatten(normaliser.denormalise(current, stats), layout)
        loss = sum(world.loss(task, factors, support) for task, support in objective)
        (grad,) = torch.autograd.grad(loss, current)
        current = (current - lr * grad).detach()
    return current


def evaluate_meta_loss(trained: TrainedFVAE, data: Sequence[TaskSnapshots], *, seed: int = 0) -> float:
    """The mean Algorithm 1 loss (meta + first pass, as trained, at the full β, without denoising noise) over every
    snapshot, with fixed noise `seed`: comparable between an untrained and a trained F-VAE of the same data."""
    config, fvae = trained.config, trained.fvae.eval()
    noise = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    for item in data:
        for flat in item.flats:
            target, condition, stats = trained.prepare(flat.float(), item.support)
            with torch.no_grad():
                recon, mu, logvar = fvae(target[None], condition[None], generator=noise)
                first = loss = vae_loss(recon, target[None], mu, logvar, config.beta, config.free_bits)
            if config.inner_steps:
                adapted = inner_loop(trained.world, trained.layout, trained.normaliser, recon[0], stats,
                                     item.objective, config.inner_steps, config.inner_lr)
                with torch.no_grad():
                    recon2, mu2, logvar2 = fvae(adapted[None], condition[None], generator=noise)
                    loss = vae_loss(recon2, target[None], mu2, logvar2, config.beta, config.free_bits)
                    loss = loss + config.first_pass_weight * first
            total += float(loss)
            count += 1
    return total / count


def _checkpoint_steps(root: Path) -> list[int]:
    return sorted(int(p.name.removeprefix("step-")) for p in root.glob("step-*")
                  if p.name.removeprefix("step-").isdigit() and (p / "state.pt").is_file())


def _identity(config: MetaTrainConfig) -> str:
    """What a checkpoint must share with the run that resumes it: every setting but the length and the logging."""
    settings = {k: v for k, v in asdict(config).items() if k not in ("steps", "log_every", "checkpoint_every")}
    return json.dumps(settings, sort_keys=True, default=str)


def _save_checkpoint(root: Path, step: int, accelerator: Any, model: torch.nn.Module, optimizer: Any,
                     sampler: torch.Generator, noise: torch.Generator, history: list[dict[str, float]],
                     identity: str) -> None:
    if not accelerator.is_main_process:
        return
    target = root / f"step-{step}"
    stage = root / f".step-{step}.incomplete"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    state = {
        "model": accelerator.unwrap_model(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "sampler": sampler.get_state(),
        "noise": noise.get_state(),
        "torch_rng": torch.get_rng_state(),
        "identity": identity,
    }
    accelerator.save(state, stage / "state.pt")
    (stage / "history.json").write_text(json.dumps(history))
    shutil.rmtree(target, ignore_errors=True)
    stage.rename(target)
    for older in _checkpoint_steps(root):  # the newest is all a resume needs; each holds the F-VAE and Adam state
        if older < step:
            shutil.rmtree(root / f"step-{older}", ignore_errors=True)


def _resume(root: Path, accelerator: Any, model: torch.nn.Module, optimizer: Any, sampler: torch.Generator,
            noise: torch.Generator, identity: str) -> tuple[int, list[dict[str, float]]]:
    steps = _checkpoint_steps(root) if root.is_dir() else []
    if not steps:
        return 0, []
    folder = root / f"step-{steps[-1]}"
    state = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
    if state.get("identity") != identity:
        raise FVAECheckpointError(
            f"{folder} is a checkpoint of a run with other settings; delete {root} to start over, "
            "or write this run elsewhere."
        )
    try:
        accelerator.unwrap_model(model).load_state_dict(state["model"])
    except RuntimeError:
        raise FVAECheckpointError(
            f"{folder} holds an F-VAE of another shape (another layout or rank); delete {root} to start over."
        ) from None
    optimizer.load_state_dict(state["optimizer"])
    sampler.set_state(state["sampler"])
    noise.set_state(state["noise"])
    torch.set_rng_state(state["torch_rng"])
    return steps[-1], json.loads((folder / "history.json").read_text())
