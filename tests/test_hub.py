"""Hub round trips with the real huggingface_hub client against the local fake Hub (never the internet)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from lora_fusion import load_adapter, merge
from lora_fusion.errors import HubError, NotALoraAdapterError, SourceNotFoundError
from lora_fusion_cli.main import app

TOKEN = "hf_fake_secret_token_0123456789"


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_pull_merge_push_and_pull_again_into_peft(hub, make_llama_lora, load_llama, llama_dir, tmp_path) -> None:
    from peft import PeftModel

    hub.add_repo("org/tiny-llama", files_of(llama_dir))
    commit_a = hub.add_repo("org/lora-a", files_of(make_llama_lora(seed=1, r=4, lora_alpha=8)))
    b_files = {f"adapters/b/{k}": v for k, v in files_of(make_llama_lora(seed=2, r=2)).items()}
    hub.add_repo("org/lora-b", {"README.md": b"main has no adapter yet"})
    commit_b = hub.add_repo("org/lora-b", b_files, branch="v2")  # a branch, resolved to its commit

    first = load_adapter("org/lora-a")
    second = load_adapter("org/lora-b@v2", subfolder="adapters/b")
    assert (first.source.commit, second.source.commit) == (commit_a, commit_b)
    downloaded = {path.rsplit("/", 1)[-1] for method, path in hub.requests if "/resolve/" in path}
    assert downloaded == {"adapter_config.json", "adapter_model.safetensors"}  # never base-model weights

    merged = merge([first, second], method="svd", weights=[1.0, -0.5], rank=6)
    url = merged.push_to_hub("me/merged", private=True, commit_message="merge a and b")
    assert "me/merged" in url
    card = hub.repo_files("me/merged")["README.md"].decode()
    assert commit_a in card and commit_b in card and "`svd`" in card

    reloaded = PeftModel.from_pretrained(load_llama(), "me/merged").eval()
    expected = load_llama()
    with torch.no_grad():
        for name in merged.modules:
            expected.get_submodule(name).weight += merged.delta(name)
        tokens = torch.randint(0, 128, (2, 5))
        assert torch.allclose(reloaded(tokens).logits, expected(tokens).logits, atol=1e-5)


def test_cli_merges_hub_ids_and_pushes(hub, make_llama_lora, tmp_path) -> None:
    hub.add_repo("org/a", files_of(make_llama_lora(seed=3)))
    hub.add_repo("org/b", files_of(make_llama_lora(seed=4)))
    out = tmp_path / "merged"
    result = CliRunner().invoke(
        app, ["merge", "org/a", "org/b@main", "--method", "linear", "--out", str(out), "--push-to-hub", "me/ab"]
    )
    assert result.exit_code == 0, result.output
    assert hub.repo_files("me/ab")["adapter_config.json"] == (out / "adapter_config.json").read_bytes()
    pushed = CliRunner().invoke(app, ["push", str(out), "me/ab-copy", "--revision", "dev", "--commit-message", "copy"])
    assert pushed.exit_code == 0, pushed.output
    assert "adapter_model.safetensors" in hub.repo_files("me/ab-copy", "dev")


def test_missing_repo_is_a_clear_error(hub) -> None:
    with pytest.raises(SourceNotFoundError, match="no such Hub repo"):
        load_adapter("org/nothing-here")


def test_missing_revision_is_a_clear_error(hub, make_llama_lora) -> None:
    hub.add_repo("org/a", files_of(make_llama_lora()))
    with pytest.raises(SourceNotFoundError, match="revision"):
        load_adapter("org/a@no-such-branch")


def test_full_model_repo_is_not_an_adapter(hub, llama_dir) -> None:
    hub.add_repo("org/full-model", files_of(llama_dir))
    with pytest.raises(NotALoraAdapterError, match="not a PEFT LoRA adapter"):
        load_adapter("org/full-model")


def test_private_repo_needs_the_token_which_is_never_written(hub, make_llama_lora, tmp_path, monkeypatch) -> None:
    hub.required_token = TOKEN
    hub.add_repo("org/secret", files_of(make_llama_lora()), private=True)
    with pytest.raises(SourceNotFoundError, match="private"):
        load_adapter("org/secret")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    result = CliRunner().invoke(app, ["merge", "org/secret", "--out", str(tmp_path / "o"), "--push-to-hub", "me/s"])
    assert result.exit_code == 0, result.output
    assert TOKEN not in result.output
    for blob in [*files_of(tmp_path / "o").values(), *hub.repo_files("me/s").values()]:
        assert TOKEN.encode() not in blob


def test_push_without_credentials_is_refused_and_keeps_the_local_result(hub, make_llama_lora, tmp_path) -> None:
    hub.required_token = TOKEN
    hub.add_repo("org/a", files_of(make_llama_lora()))
    out = tmp_path / "kept"
    result = CliRunner().invoke(app, ["merge", "org/a", "--out", str(out), "--push-to-hub", "me/denied"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "401" in result.stderr or "log in" in result.stderr
    assert (out / "adapter_model.safetensors").is_file()


def test_network_down_gives_the_offline_hint(hub) -> None:
    hub.go_down()
    try:
        with pytest.raises(HubError, match="HF_HUB_OFFLINE"):
            load_adapter("org/unreachable")
    finally:
        hub.come_up()


def test_offline_mode_uses_the_cache(hub, make_llama_lora, monkeypatch) -> None:
    import huggingface_hub.constants

    hub.add_repo("org/cached", files_of(make_llama_lora(seed=5)))
    online = load_adapter("org/cached")
    hub.go_down()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    try:
        offline = load_adapter("org/cached")
        name = next(iter(online.modules))
        assert offline.source.commit == online.source.commit
        assert torch.equal(offline.delta(name), online.delta(name))
        with pytest.raises(HubError, match="not in the local cache"):
            load_adapter("org/never-downloaded")
    finally:
        hub.come_up()


def test_model_card_and_metadata_record_resolved_commits(hub, make_llama_lora, tmp_path) -> None:
    commit = hub.add_repo("org/a", files_of(make_llama_lora()))
    out = merge(["org/a@main"], method="task_arithmetic", scale=0.5).save_pretrained(tmp_path / "ta")
    from safetensors import safe_open

    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        record = json.loads(f.metadata()["lora_fusion"])
    assert record["sources"][0] == {"source": "org/a", "revision": "main", "subfolder": None, "commit": commit, "weight": 1.0}
    assert record["params"] == {"scale": 0.5} and record["lora_fusion_version"]
    assert commit in (out / "README.md").read_text()
