"""The F-VAE: a conditional VAE over flat, normalised LoRA vectors, conditioned on a task vector.

Encoder E([l; v]) → (μ, log σ²), decoder D([z; v]) → l (the Algorithm 1 form of ICM-Fusion, Shao et al., AAAI 2026,
arXiv:2508.04153, as paraphrased in docs/icm.md); loss MSE(l̂, l) + β·KL(N(μ, σ²) ‖ N(0, I)) with β = 0.005 and
the KL summed over latent dimensions and averaged over the batch, as in ICM-LoRA's `model/CVAE_design.py`
(Shao et al., IJCAI 2025, arXiv:2501.17635).

Two bodies by size (docs/icm.md):

* ``mlp`` (D ≤ 16,384 by default): [l; v] → H → H → (μ, log σ²) and [z; v] → H → H → D.
* ``conv``: ICM-LoRA's 1-D convolution stack. l is right-padded to a multiple of 2^S and passed through S stride-2
  Conv1d blocks (kernel 7), flattened and projected to H; v joins there (ICM-LoRA joins the condition after its
  `to_latent` layer, which is functionally close to the Algorithm 1 form). The decoder mirrors it with
  ConvTranspose1d. GroupNorm replaces ICM-LoRA's BatchNorm: F-VAE batches are one task at a time (and a single
  fused LoRA at inference), where batch statistics are meaningless.

Options against posterior collapse (docs/icm.md, "A latent that matters"; defaults off, the form above unchanged):

* ``condition_dropout`` p: in training, each sample's task vector is replaced by a learned null vector with
  probability p (classifier-free guidance's condition dropout, Ho & Salimans 2022, arXiv:2207.12598), so the decoder
  must be able to rebuild a LoRA from z alone. ``decoder_condition=False`` removes v from the decoder altogether.
* ``decoder_hidden_dim``: a narrower decoder (ours; its weight decay is a meta-training option).
* `kl_per_dimension` with free bits (Kingma et al., NeurIPS 2016, arXiv:1606.04934) and `annealed_beta`
  (Bowman et al., CoNLL 2016, arXiv:1511.06349) are the loss-side options, used by meta-training.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from lora_fusion.errors import InvalidParameterError

Architecture = Literal["auto", "mlp", "conv"]
MLP_MAX_NUMEL = 16_384
# Upper bound of log σ² (σ ≤ e ≈ 2.7, beyond the prior's 1). Without it a posterior variance can grow faster than the
# small KL weight pulls it back, and one sample z far off the data makes the decoded LoRA explode in the inner loop
# (measured: log σ² 20 → 134 within 5 steps, then an infinite loss, on the long-tailed MiniLM setting).
LOGVAR_MAX = 2.0
# ICM-LoRA's encoder channels (1→8→…→8 over 12 stages); shorter stacks take the first stages.
ICM_LORA_CHANNELS = (8, 16, 32, 64, 128, 256, 256, 128, 64, 32, 16, 8)


@dataclass(frozen=True)
class FVAEConfig:
    """Shape and loss weight of an F-VAE."""

    numel: int = field(metadata={"help": "D, the length of a flat LoRA vector of the layout."})
    condition_dim: int = field(metadata={"help": "c, the length of a task vector."})
    latent_dim: int = field(default=16, metadata={"help": "Latent size (docs/icm.md: 16 for the MLP form)."})
    hidden_dim: int = field(default=256, metadata={"help": "Width H of the hidden layers."})
    beta: float = field(default=0.005, metadata={"help": "KL weight β (ICM-LoRA's 0.005)."})
    architecture: Architecture = field(default="auto", metadata={"help": "mlp, conv, or auto (mlp if D ≤ 16,384)."})
    conv_stages: int = field(default=12, metadata={"help": "Stride-2 stages of the conv form (pads D to 2^S·k)."})
    condition_dropout: float = field(
        default=0.0, metadata={"help": "p: in training, replace a sample's task vector by a learned null vector."}
    )
    decoder_condition: bool = field(default=True, metadata={"help": "False: the decoder sees z only, D(z)."})
    decoder_hidden_dim: int | None = field(default=None, metadata={"help": "Decoder width (None: hidden_dim)."})

    def __post_init__(self) -> None:
        for name in ("numel", "condition_dim", "latent_dim", "hidden_dim"):
            if getattr(self, name) < 1:
                raise InvalidParameterError(name, getattr(self, name), expected="a positive integer")
        if self.beta < 0:
            raise InvalidParameterError("beta", self.beta, expected="a KL weight ≥ 0, e.g. 0.005")
        if self.architecture not in ("auto", "mlp", "conv"):
            raise InvalidParameterError("architecture", self.architecture, expected="'auto', 'mlp' or 'conv'")
        if not 0 <= self.condition_dropout < 1:
            raise InvalidParameterError("condition_dropout", self.condition_dropout, expected="p in [0, 1), e.g. 0.5")
        if self.decoder_hidden_dim is not None and self.decoder_hidden_dim < 1:
            raise InvalidParameterError("decoder_hidden_dim", self.decoder_hidden_dim,
                                        expected="a positive integer, or None for hidden_dim")
        if self.decoder_hidden_dim is not None and self.body == "conv":
            raise InvalidParameterError("decoder_hidden_dim", self.decoder_hidden_dim,
                                        expected="None with the conv body (its decoder width is its channel stack)")
        if not 1 <= self.conv_stages <= len(ICM_LORA_CHANNELS):
            raise InvalidParameterError("conv_stages", self.conv_stages, expected=f"1 … {len(ICM_LORA_CHANNELS)}")

    @property
    def body(self) -> Literal["mlp", "conv"]:
        if self.architecture != "auto":
            return self.architecture
        return "mlp" if self.numel <= MLP_MAX_NUMEL else "conv"

    @property
    def decoder_width(self) -> int:
        return self.hidden_dim if self.decoder_hidden_dim is None else self.decoder_hidden_dim

    @property
    def decoder_input_dim(self) -> int:
        """k + c with the condition in the decoder, else k."""
        return self.latent_dim + (self.condition_dim if self.decoder_condition else 0)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


class FVAE(nn.Module):
    """Conditional VAE over flat normalised LoRAs: `encode(l, v)`, `decode(z, v)`, `forward` = both with sampling."""

    def __init__(self, config: FVAEConfig) -> None:
        super().__init__()
        self.config = config
        c, h, k = config.condition_dim, config.hidden_dim, config.latent_dim
        if config.body == "mlp":
            self.encoder_body: nn.Module = nn.Sequential(
                nn.Linear(config.numel + c, h), nn.LeakyReLU(), nn.Linear(h, h), nn.LeakyReLU()
            )
            hd = config.decoder_width
            self.decoder_body: nn.Module = nn.Sequential(
                nn.Linear(config.decoder_input_dim, hd), nn.LeakyReLU(), nn.Linear(hd, hd), nn.LeakyReLU(),
                nn.Linear(hd, config.numel)
            )
        else:
            self.encoder_body = _ConvEncoder(config)
            self.decoder_body = _ConvDecoder(config)
        self.to_mu = nn.Linear(h, k)
        self.to_logvar = nn.Linear(h, k)
        if config.condition_dropout:
            # the learned "no task" vector of condition dropout; only F-VAEs trained with it have the parameter
            self.null_condition = nn.Parameter(torch.zeros(c))

    def encode(self, flat: torch.Tensor, condition: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(μ, log σ²) = E([l; v]) for a batch of flat LoRAs (B×D) and task vectors (B×c); log σ² is bounded softly
        by `LOGVAR_MAX` (m − softplus(m − x), smooth, so the KL gradient never vanishes)."""
        if self.config.body == "mlp":
            hidden = self.encoder_body(torch.cat([flat, condition], dim=-1))
        else:
            hidden = self.encoder_body(flat, condition)
        logvar = LOGVAR_MAX - F.softplus(LOGVAR_MAX - self.to_logvar(hidden))
        return self.to_mu(hidden), logvar

    def decode(self, z: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """l = D([z; v]), B×D (D(z) when the config has `decoder_condition=False`: v is then ignored)."""
        return self.decoder_body(torch.cat([z, condition], dim=-1) if self.config.decoder_condition else z)

    def forward(self, flat: torch.Tensor, condition: torch.Tensor, *, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encode, reparameterise z = μ + σ·ε (ε ~ N(0, I)), decode: returns (l̂, μ, log σ²). In training mode with
        `condition_dropout` p > 0, each sample's condition is first replaced by the null vector with probability p
        (`drop_conditions`, drawn from `generator`), for the encoder and the decoder alike."""
        if self.training and self.config.condition_dropout:
            condition, _ = drop_conditions(condition, self.null_condition, self.config.condition_dropout, generator)
        mu, logvar = self.encode(flat, condition)
        noise = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        z = mu + torch.exp(0.5 * logvar) * noise
        return self.decode(z, condition), mu, logvar


def drop_conditions(condition: torch.Tensor, null: torch.Tensor, p: float, generator: torch.Generator | None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Condition dropout (Ho & Salimans 2022, arXiv:2207.12598): each row of `condition` (B×c) becomes `null` with
    probability p, one uniform draw per row from `generator`. Returns (conditions, the boolean mask of dropped rows)."""
    dropped = torch.rand(condition.shape[0], generator=generator, device=condition.device) < p
    return torch.where(dropped[:, None], null.to(condition.dtype).expand_as(condition), condition), dropped


def kl_per_dimension(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(μ_d, σ_d²) ‖ N(0, 1)) = −½(1 + log σ_d² − μ_d² − σ_d²) per latent dimension d, averaged over the batch."""
    return (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp())).mean(0)


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor, free_bits: float = 0.0) -> torch.Tensor:
    """KL(N(μ, σ²) ‖ N(0, I)) summed over the latent, averaged over the batch. With `free_bits` λ > 0, each
    dimension's batch-mean KL counts as max(λ, KL_d): below λ nats a dimension costs nothing and gets no KL gradient
    (free bits, Kingma et al., NeurIPS 2016, arXiv:1606.04934, here per dimension)."""
    per_dimension = kl_per_dimension(mu, logvar)
    if free_bits:
        per_dimension = per_dimension.clamp(min=free_bits)
    return per_dimension.sum()


def annealed_beta(beta: float, step: int, warmup_steps: int) -> float:
    """KL annealing (Bowman et al., CoNLL 2016, arXiv:1511.06349): β·min(1, (step − 1)/warmup_steps) for 1-based
    steps, so step 1 has weight 0 and the full β is reached after `warmup_steps`; `warmup_steps` 0 gives β."""
    return beta if warmup_steps <= 0 else beta * min(1.0, (step - 1) / warmup_steps)


def vae_loss(recon: torch.Tensor, target: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, beta: float,
             free_bits: float = 0.0) -> torch.Tensor:
    """MSE(l̂, l) + β·KL: ICM-LoRA's CVAE loss (Eq. 11–12 of ICM-Fusion's Algorithm 1); `free_bits` as in
    [`kl_divergence`]."""
    return F.mse_loss(recon, target) + beta * kl_divergence(mu, logvar, free_bits)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _padded_length(config: FVAEConfig) -> int:
    unit = 2**config.conv_stages
    return -(-config.numel // unit) * unit


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(1, channels)


class _ConvEncoder(nn.Module):
    """S blocks of Conv1d(k 7, stride 2, pad 3) → GroupNorm → LeakyReLU, flattened, then Linear → H and [·; v] → H."""

    def __init__(self, config: FVAEConfig) -> None:
        super().__init__()
        channels = (1, *ICM_LORA_CHANNELS[: config.conv_stages])
        self.numel, self.padded = config.numel, _padded_length(config)
        self.blocks = nn.Sequential(*[
            nn.Sequential(nn.Conv1d(c_in, c_out, 7, stride=2, padding=3), _norm(c_out), nn.LeakyReLU())
            for c_in, c_out in zip(channels[:-1], channels[1:])
        ])
        flat_size = channels[-1] * self.padded // 2**config.conv_stages
        self.to_hidden = nn.Linear(flat_size, config.hidden_dim)
        self.with_condition = nn.Sequential(nn.Linear(config.hidden_dim + config.condition_dim, config.hidden_dim),
                                            nn.LeakyReLU())

    def forward(self, flat: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        padded = F.pad(flat, (0, self.padded - self.numel)).unsqueeze(1)
        hidden = self.to_hidden(self.blocks(padded).flatten(1))
        return self.with_condition(torch.cat([hidden, condition], dim=-1))


class _ConvDecoder(nn.Module):
    """[z; v] → Linear → (C, L/2^S), S ConvTranspose1d blocks (×2 each), Conv1d → 1 channel, cut to D."""

    def __init__(self, config: FVAEConfig) -> None:
        super().__init__()
        channels = (*reversed(ICM_LORA_CHANNELS[: config.conv_stages]), 8)
        self.numel, self.padded = config.numel, _padded_length(config)
        self.start_channels, self.start_length = channels[0], self.padded // 2**config.conv_stages
        self.from_latent = nn.Linear(config.decoder_input_dim, channels[0] * self.start_length)
        self.blocks = nn.Sequential(*[
            nn.Sequential(nn.ConvTranspose1d(c_in, c_out, 7, stride=2, padding=3, output_padding=1), _norm(c_out),
                          nn.ELU())
            for c_in, c_out in zip(channels[:-1], channels[1:])
        ])
        self.to_output = nn.Conv1d(channels[-1], 1, 7, padding=3)

    def forward(self, latent_and_condition: torch.Tensor) -> torch.Tensor:
        start = self.from_latent(latent_and_condition).view(-1, self.start_channels, self.start_length)
        return self.to_output(self.blocks(start)).squeeze(1)[:, : self.numel]
