"""Studies that produce the README's tables and the evidence in docs/: one module per study, run from the repository
root as `python -m experiments.<study>` (the package is not installed; the library never imports it).

* `quickstart_eval`: the demo's evaluation (`make demo`) of the shipped quickstart adapters and a merge of them;
* `train_quickstart`: trains the quickstart adapters and heads shipped in `recipes/quickstart/`;
* `merge_quality`: every registered method on the real-task MiniLM testbed (docs/results/merge_quality.md);
* `rapf_evidence`: the RAPF component ablation and sweeps on Fashion-MNIST (docs/rapf.md);
* `icm_evidence`: ICM-Fusion against the merge baselines on the MiniLM testbed (docs/icm.md);
* `rapf_alignment_sweep`: RAPF's ablation ladder in a controlled image-text space (alignment ρ) and on ConSE
  features of real images (docs/rapf.md §6);
* `per_module_weights`: per-module weights against one global λ on the MiniLM testbed
  (docs/results/per_module_weights.md);
* `causal_lm`: the merges, LoRAHub and ICM-Fusion on SmolLM2-135M-Instruct LoRAs with the 4 testbed tasks posed as
  generation (docs/results/causal_lm.md).

Every study declares and parses its shared options (seeds, output folder, data folders, torch threads, device) with
`experiments._args`.
"""
