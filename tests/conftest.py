"""Shared fixtures: a local fake Hub (started before huggingface_hub is imported), tiny base models and real PEFT
adapters written by PEFT itself."""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.hub_server import FakeHub

HUB = FakeHub()


def pytest_configure(config: pytest.Config) -> None:
    # huggingface_hub reads HF_ENDPOINT when it is imported, so the server must be up before any test module loads.
    HUB.start()
    os.environ["HF_ENDPOINT"] = HUB.url
    os.environ["HF_HUB_CACHE"] = tempfile.mkdtemp(prefix="lora-fusion-hub-cache-")
    os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    os.environ.pop("HF_HUB_OFFLINE", None)
    os.environ.pop("TRANSFORMERS_OFFLINE", None)
    os.environ.pop("HF_TOKEN", None)
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")


def pytest_unconfigure(config: pytest.Config) -> None:
    HUB.stop()


@pytest.fixture
def hub() -> FakeHub:
    """The fake Hub, emptied for each test."""
    HUB.reset()
    return HUB


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama (vocab 128, hidden 64, 2 layers) saved with transformers."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
    )
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def load_llama(llama_dir: Path) -> Callable[[], object]:
    from transformers import LlamaForCausalLM

    return lambda: LlamaForCausalLM.from_pretrained(llama_dir).eval()


@pytest.fixture
def make_llama_lora(tmp_path: Path, load_llama: Callable[[], object]) -> Callable[..., Path]:
    """Write a real PEFT LoRA of the tiny Llama (random A and B) and return its directory."""
    counter = iter(range(1000))

    def make(*, seed: int = 0, **lora_kwargs: object) -> Path:
        import torch
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(seed)
        lora_kwargs.setdefault("target_modules", ["q_proj", "v_proj"])
        model = get_peft_model(load_llama(), LoraConfig(init_lora_weights=False, **lora_kwargs))
        out = tmp_path / f"lora-{next(counter)}"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.save_pretrained(out)
        return out

    return make
