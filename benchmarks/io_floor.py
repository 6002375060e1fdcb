"""The I/O floor of a merge: read every tensor of the input adapters, write one adapter-sized safetensors file.

Run as its own process by `bench_7b_shape.py`, so that its wall time and peak RSS include the same interpreter
startup and `import torch, safetensors` as the CLI, and nothing else: no validation, no math, no model card. The
tensors of the first input are kept and written as the output, so the output holds exactly as many elements, of the
same dtype, as a merge at the inputs' rank (the default of `lora-fusion merge --method svd`).

Usage: python benchmarks/io_floor.py --out FILE.safetensors ADAPTER_DIR [ADAPTER_DIR ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file


def read_adapter(folder: Path, keep: bool) -> tuple[int, dict[str, torch.Tensor]]:
    """Read every tensor of `folder`/adapter_model.safetensors into memory (get_tensor copies it out of the file),
    one at a time; return the number of elements read and, if `keep`, the tensors (else each is dropped once read)."""
    elements, kept = 0, {}
    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt", device="cpu") as file:
        for key in file.keys():
            tensor = file.get_tensor(key)
            elements += tensor.numel()
            if keep:
                kept[key] = tensor
    return elements, kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("adapters", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    read, output = 0, {}
    for index, folder in enumerate(args.adapters):
        elements, kept = read_adapter(folder, keep=index == 0)
        read, output = read + elements, output or kept
    save_file(output, str(args.out))
    print(json.dumps({"read_elements": read, "written_elements": sum(t.numel() for t in output.values())}))


if __name__ == "__main__":
    main()
