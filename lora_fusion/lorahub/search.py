"""The two weight searches of LoRAHub, on any objective of a weight vector w ∈ [−1.5, 1.5]^d starting at w = 0.

* [`gradient_free`]: CMA-ES from the `cma` package (Hansen's maintained implementation). LoRAHub calls nevergrad's
  NGOpt, which picks among optimisers (CMA-ES variants among them) by dimension and budget; nevergrad 1.0.12 needs
  pandas, scipy and scikit-learn (through bayesian-optimization), `cma` needs only numpy.
* [`gradient`]: Adam on w, the objective differentiated through the frozen model (LoRA Soups' CAT learns its
  per-layer weights by gradient descent).

Both spend exactly `budget` evaluations (an Adam step is one evaluation), count w = 0 (the base model) as the
first, and return the best point evaluated with the objective's trajectory. Same objective, budget and seed: same
result, bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

BOUND = 1.5  # LoRAHub's box: every weight in [−1.5, 1.5]
INITIAL_STEP = 0.5  # CMA-ES's initial σ: a sixth of the box's width, within CMA's advice of ¼–⅙ of the domain
LEARNING_RATE = 0.05  # Adam's step on w: about 30 steps cross the box
TRAJECTORY_POINTS = 10


@dataclass(frozen=True)
class SearchResult:
    """The best weights found, their objective, the objective at w = 0, the best objective after each tenth of the
    evaluations (`trajectory`), and the number of evaluations."""

    weights: list[float]
    best: float
    initial: float
    trajectory: list[float]
    evaluations: int


class _Tracker:
    """Counts evaluations and keeps the best point and the best-so-far trajectory."""

    def __init__(self, budget: int) -> None:
        self.budget, self.evaluations = budget, 0
        self.best_value, self.best_weights, self.initial = math.inf, [0.0], math.nan
        self.marks = sorted({max(1, round(budget * k / TRAJECTORY_POINTS)) for k in range(1, TRAJECTORY_POINTS + 1)})
        self.trajectory: list[float] = []

    def record(self, weights: list[float], value: float) -> None:
        self.evaluations += 1
        if self.evaluations == 1:
            self.initial = value
        if value < self.best_value:  # the first of equal values is kept: deterministic
            self.best_value, self.best_weights = value, weights
        if self.evaluations in self.marks:
            self.trajectory.append(self.best_value)

    def result(self) -> SearchResult:
        return SearchResult(self.best_weights, self.best_value, self.initial, self.trajectory, self.evaluations)


def gradient_free(objective: Callable[[torch.Tensor], float], size: int, *, budget: int, seed: int) -> SearchResult:
    """Minimise `objective` over [−1.5, 1.5]^size with CMA-ES (Hansen & Ostermeier 2001; the `cma` package, bounds
    by its boundary transformation), from w = 0 with σ₀ = 0.5: w = 0 is evaluated first, then whole generations while
    they fit the budget, then part of one more (asked, evaluated, not told), so exactly `budget` evaluations."""
    import cma
    import numpy as np

    tracker = _Tracker(budget)

    def evaluate(point: np.ndarray) -> float:
        weights = torch.tensor(point, dtype=torch.float32)
        value = float(objective(weights))
        tracker.record(weights.tolist(), value)
        return value

    evaluate(np.zeros(size))
    # cma draws from numpy's global generator, seeded by `seed` (0 there means "from the clock", hence seed + 1)
    state = np.random.get_state()
    try:
        strategy = cma.CMAEvolutionStrategy(np.zeros(size), INITIAL_STEP, {
            "bounds": [-BOUND, BOUND], "seed": seed + 1, "verbose": -9, "verb_log": 0, "verb_disp": 0,
        })
        while tracker.evaluations < budget:
            left = budget - tracker.evaluations
            points = strategy.ask(min(left, strategy.popsize))
            values = [evaluate(point) for point in points]
            if len(points) < strategy.popsize:
                break
            strategy.tell(points, values)
    finally:
        np.random.set_state(state)
    return tracker.result()


def gradient(objective: Callable[[torch.Tensor], torch.Tensor], size: int, *, budget: int, seed: int) -> SearchResult:
    """Minimise a differentiable `objective` with Adam (lr 0.05) from w = 0, `budget` steps, w clamped to
    [−1.5, 1.5] after each; every step evaluates the current w once. `seed` seeds torch for the objective's own
    draws (there are none in LoRAHub's loss: the model runs in eval mode)."""
    tracker = _Tracker(budget)
    weights = torch.zeros(size, requires_grad=True)
    optimizer = torch.optim.Adam([weights], lr=LEARNING_RATE)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _ in range(budget):
            value = objective(weights)
            tracker.record(weights.detach().tolist(), float(value.detach()))
            optimizer.zero_grad()
            value.backward()
            optimizer.step()
            with torch.no_grad():
                weights.clamp_(-BOUND, BOUND)
    return tracker.result()
