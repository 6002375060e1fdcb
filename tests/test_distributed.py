"""Sharded merges on two CPU processes (torchrun, gloo) and base-model weights read per module."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lora_fusion import load_adapter, merge
from lora_fusion.base_weights import BaseWeights
from lora_fusion.distributed import Shard
from lora_fusion.errors import IncompatibleAdaptersError, InvalidParameterError, SourceNotFoundError

TORCHRUN = Path(sys.executable).with_name("torchrun")


def write_adapter(path: Path, seed: int, *, layers: int = 3, hidden: int = 48, rank: int = 4) -> Path:
    """A Llama-style LoRA written directly as PEFT stores it (no peft import: the launched processes stay light)."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(layers):
        for proj in ("q_proj", "v_proj"):
            key = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, hidden, generator=generator)
            tensors[f"{key}.lora_B.weight"] = torch.randn(hidden, rank, generator=generator)
    path.mkdir(parents=True)
    save_file(tensors, path / "adapter_model.safetensors")
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
              "base_model_name_or_path": "tiny-llama"}
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path


@pytest.fixture
def adapters(tmp_path: Path) -> list[Path]:
    return [write_adapter(tmp_path / f"lora-{i}", seed=i) for i in range(3)]


def launch(*args: object, processes: int = 2) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    command = [str(TORCHRUN), "--standalone", f"--nproc_per_node={processes}", "-m", "lora_fusion_cli", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.parametrize("method", [["svd", "--rank", "6"], ["dare_ties", "--density", "0.5", "--seed", "3"]])
def test_two_process_merge_is_byte_identical_to_one_process(adapters, tmp_path, method) -> None:
    single = merge(adapters, method=method[0], **_options(method[1:]))
    single.save_pretrained(tmp_path / "single")
    launched = launch("merge", *adapters, "--method", *method, "--out", tmp_path / "sharded", "--quiet")
    assert launched.returncode == 0, launched.stderr[-2000:]
    assert launched.stdout.count("merged 6 modules") == 1  # only the main process reports and writes
    for name in ("adapter_model.safetensors", "adapter_config.json", "README.md"):
        assert (tmp_path / "single" / name).read_bytes() == (tmp_path / "sharded" / name).read_bytes(), name


def _options(flags: list[str]) -> dict[str, object]:
    pairs = dict(zip(flags[::2], flags[1::2]))
    return {key.removeprefix("--"): (float(value) if "." in value else int(value)) for key, value in pairs.items()}


def test_a_failure_in_one_process_stops_every_process_and_writes_nothing(adapters, tmp_path) -> None:
    # Equal costs are dealt by name in turn: the second module (layer 0 v_proj) belongs to process 1 only.
    broken = adapters[2] / "adapter_model.safetensors"
    from safetensors.torch import load_file

    tensors = load_file(broken)
    tensors["base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight"][0, 0] = float("nan")
    save_file(tensors, broken)
    launched = launch("merge", *adapters, "--method", "svd", "--out", tmp_path / "out", "--quiet")
    assert launched.returncode != 0
    assert "holds NaN or Inf" in launched.stderr and "process 1 of the sharded merge failed" in launched.stderr
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_shards_balance_module_costs_even_when_module_types_repeat() -> None:
    # 8 layers of q/k/v/o with GQA (k, v 4× smaller): every-N-th dealing would give process 0 all the q_proj.
    costs = {f"l{layer}.{proj}": 4.0 if proj in "qo" else 1.0 for layer in range(8) for proj in "qkvo"}
    shares = [Shard(index=i, count=4, device="cpu").take(costs) for i in range(4)]
    assert sorted(sum(shares, [])) == sorted(costs)
    assert [sum(costs[n] for n in share) for share in shares] == [20.0] * 4


def test_base_weights_follow_the_adapter_layout(llama_dir, make_llama_lora) -> None:
    from safetensors.torch import load_file

    adapter = load_adapter(make_llama_lora(r=4))
    state = load_file(llama_dir / "model.safetensors")
    base = BaseWeights(llama_dir)
    for name, spec in adapter.modules.items():
        assert torch.equal(base.weight(spec), state[f"{name}.weight"].float())


def test_base_weights_read_shards_through_the_index_and_transpose_conv1d(tmp_path) -> None:
    from lora_fusion.spec import ModuleSpec

    first, second = torch.randn(6, 4), torch.randn(4, 6)  # nn.Linear out×in; GPT-2 Conv1D in×out
    save_file({"transformer.h.0.attn.q.weight": first}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({"transformer.h.0.attn.c_attn.weight": second}, tmp_path / "model-00002-of-00002.safetensors")
    index = {"weight_map": {"transformer.h.0.attn.q.weight": "model-00001-of-00002.safetensors",
                            "transformer.h.0.attn.c_attn.weight": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))

    def spec(name: str, m: int, n: int) -> ModuleSpec:
        return ModuleSpec(name, "linear", m, n, 2, 1.0, torch.float32, (2, n), (m, 2), "a", "b")

    base = BaseWeights(tmp_path)
    # the adapter was trained on a model class with another prefix ("h.0…"): matched on the dotted suffix
    assert torch.equal(base.weight(spec("h.0.attn.q", 6, 4)), first)
    assert torch.equal(base.weight(spec("transformer.h.0.attn.c_attn", 6, 4), fan_in_fan_out=True), second.T)
    with pytest.raises(IncompatibleAdaptersError, match="no weight for the adapters' module h.0.mlp"):
        base.weight(spec("h.0.mlp", 6, 4))
    with pytest.raises(IncompatibleAdaptersError, match="shape"):
        base.weight(spec("h.0.attn.q", 4, 6))
    bad = {"weight_map": {"x.weight": "../elsewhere.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(bad))
    with pytest.raises(SourceNotFoundError, match="outside the model folder"):
        BaseWeights(tmp_path)
    shutil.rmtree(tmp_path)
    tmp_path.mkdir()
    with pytest.raises(SourceNotFoundError, match="needs a model saved as safetensors"):
        BaseWeights(tmp_path)


def test_base_model_is_refused_by_methods_that_do_not_read_it(adapters, llama_dir) -> None:
    with pytest.raises(InvalidParameterError, match="svd reads no base weights"):
        merge(adapters, method="svd", base_model=llama_dir)


def test_a_mistyped_base_model_path_is_a_clear_error(adapters) -> None:
    with pytest.raises(SourceNotFoundError, match="not a Hub repo id"):
        merge(adapters, method="rapf", base_model="./no-such-model")


def test_dense_merges_do_not_depend_on_the_thread_count(tmp_path) -> None:
    # Above 1024 rows and columns the full-space path takes the randomized SVD, whose BLAS reductions round
    # differently with the thread count; the engine runs every module on one thread so the bytes never change.
    sources = [write_adapter(tmp_path / f"big-{i}", seed=i, layers=1, hidden=1100, rank=16) for i in range(3)]
    results, default = [], torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            merged = merge(sources, method="ties", density=0.3, rank=16)
            results.append(merged.delta("model.layers.0.self_attn.q_proj"))
    finally:
        torch.set_num_threads(default)
    assert torch.equal(*results)


def openmp_threads() -> int:
    """OpenMP's thread count for the calling thread, from torch's own runtime: `torch.get_num_threads()` reports torch's
    setting, which a thread started after it was set does not get."""
    import ctypes

    return ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so")).omp_get_max_threads()


def test_the_engines_workers_run_torch_on_one_thread(adapters, monkeypatch) -> None:
    # Before runtime.torch_thread_pool, thread_limit(1) reached the main thread only and each worker ran MKL on every
    # core: spinning on shared cores, and bytes that changed from run to run (MKL's threaded reductions).
    from lora_fusion import engine
    from lora_fusion.runtime import torch_thread_pool

    if (os.cpu_count() or 1) < 2:
        assert openmp_threads() == 1  # one core: no worker can run more; nothing else to check
        return
    with torch_thread_pool(2) as pool:
        assert list(pool.map(lambda _: openmp_threads(), range(4))) == [1] * 4
    seen, moved = [], engine._to

    def probe(factors, device):
        seen.append(openmp_threads())
        return moved(factors, device)

    monkeypatch.setattr(engine, "_to", probe)
    merge(adapters, method="svd")
    assert seen and set(seen) == {1}
    assert openmp_threads() == torch.get_num_threads()  # the caller's own count is restored


def test_a_process_killed_outright_stops_the_launch_and_writes_nothing(adapters, tmp_path) -> None:
    # Process 1 dies by SIGKILL in the middle of its share (injected through sitecustomize, test code only): the
    # launcher stops process 0, which has not written anything yet, and nothing is left behind.
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import os, signal\n"
        "if os.environ.get('RANK') == '1':\n"
        "    import lora_fusion.engine as engine\n"
        "    def die(*args, **kwargs):\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    engine.merge_modules = die\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(hook), env.get("PYTHONPATH", "")])
    command = [str(TORCHRUN), "--standalone", "--nproc_per_node=2", "-m", "lora_fusion_cli", "merge", *map(str, adapters),
               "--method", "svd", "--out", str(tmp_path / "out"), "--quiet"]
    launched = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert launched.returncode != 0 and "SIGKILL" in launched.stderr
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
