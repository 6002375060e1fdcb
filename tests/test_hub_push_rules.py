"""Issue 12, item 4: pushes that surprised. `--private` never publishes into an existing public repo, offline mode
is named as the reason an upload cannot happen, and an unchanged push to a branch says so with that branch's commit.

The real huggingface_hub client talks to the local FakeHub (tests/hub_server.py); docs/reliability.md tables each case.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lora_fusion import merge
from lora_fusion.errors import HubError, HubOfflineError, LoraFusionError, PublicRepoError
from lora_fusion.hub import PushResult, push_folder
from tests.test_cli import assert_user_error
from tests.test_reliability import ROOT, hidden_leftovers, invoke, lora, snapshot


def uploads(hub) -> list[tuple[str, str]]:
    """The requests that carry or commit files (what must not happen when a push is refused)."""
    return [(m, p) for m, p in hub.requests if "/preupload/" in p or "/commit/" in p]


@pytest.fixture
def adapter_dir(tmp_path) -> Path:
    return merge([lora(tmp_path / "a", seed=1)]).save_pretrained(tmp_path / "merged")


# --------------------------------------------------------------------------------------------- --private


def test_private_push_into_an_existing_public_repo_is_refused_before_uploading(hub, adapter_dir) -> None:
    head = hub.add_repo("me/public", {"README.md": b"public already"})
    with pytest.raises(PublicRepoError) as caught:
        push_folder(adapter_dir, "me/public", private=True)
    message = str(caught.value)
    assert "me/public exists and is public" in message and "nothing was uploaded" in message
    assert "Make the repo private on the Hub" in message and "without --private" in message and "\n" not in message
    assert isinstance(caught.value, HubError) and isinstance(caught.value, LoraFusionError)
    assert uploads(hub) == [] and hub.commit_sha("me/public") == head and hub.is_private("me/public") is False


def test_private_push_goes_through_once_the_repo_is_made_private_or_without_private(hub, adapter_dir) -> None:
    from huggingface_hub import HfApi

    hub.add_repo("me/public", {"README.md": b"public already"})
    assert push_folder(adapter_dir, "me/public").changed  # without --private: published, as asked
    HfApi().update_repo_settings("me/public", private=True)  # what the error says to do
    assert hub.is_private("me/public")
    (adapter_dir / "README.md").write_text("changed\n")
    result = push_folder(adapter_dir, "me/public", private=True)
    assert result.changed and hub.repo_files("me/public")["README.md"] == b"changed\n"


def test_private_creates_a_new_repo_private(hub, adapter_dir) -> None:
    result = push_folder(adapter_dir, "me/fresh", private=True)
    assert hub.is_private("me/fresh") and result.commit == hub.commit_sha("me/fresh")


def test_cli_push_and_merge_with_private_into_a_public_repo_are_one_line(hub, adapter_dir, tmp_path) -> None:
    head = hub.add_repo("me/public", {"README.md": b"public already"})
    assert_user_error(invoke("push", adapter_dir, "me/public", "--private"), "me/public exists and is public")
    out = tmp_path / "again"
    line = assert_user_error(
        invoke("merge", lora(tmp_path / "b", seed=2), "--out", out, "--push-to-hub", "me/public", "--private"),
        "is public",
    )
    assert f"saved in {out}" in line  # the CLI's own hint: the merge is kept and can be pushed later
    assert uploads(hub) == [] and hub.commit_sha("me/public") == head
    with pytest.raises(PublicRepoError):  # the API path: push_to_hub -> push_adapter -> push_folder
        merge([lora(tmp_path / "c")]).push_to_hub("me/public", private=True)
    assert hidden_leftovers(tmp_path) == []


# --------------------------------------------------------------------------------------------- offline mode


@pytest.fixture
def offline(monkeypatch) -> None:
    """huggingface_hub's offline mode, as HF_HUB_OFFLINE=1 sets it when the library is imported."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_offline_mode_blocks_uploads_with_one_clear_error(hub, adapter_dir, offline) -> None:
    before = snapshot(adapter_dir)
    for call in (
        lambda: push_folder(adapter_dir, "me/offline"),
        lambda: merge([lora(adapter_dir.parent / "b")]).push_to_hub("me/offline", revision="dev"),
    ):
        with pytest.raises(HubOfflineError, match="HF_HUB_OFFLINE is set: offline mode blocks uploads") as caught:
            call()
        assert "nothing was pushed to me/offline" in str(caught.value) and "Unset HF_HUB_OFFLINE" in str(caught.value)
    assert hub.requests == [] and snapshot(adapter_dir) == before


def test_cli_push_and_merge_in_offline_mode_are_one_line(hub, adapter_dir, offline, tmp_path) -> None:
    assert_user_error(invoke("push", adapter_dir, "me/offline"), "offline mode blocks uploads", "HF_HUB_OFFLINE")
    # (whether the CLI refuses before merging, with check_push_allowed, or after saving --out, it is one line)
    merged = invoke("merge", lora(tmp_path / "b"), "--out", tmp_path / "kept", "--push-to-hub", "me/offline")
    assert_user_error(merged, "offline mode blocks uploads")
    assert hub.requests == []


def test_hf_hub_offline_in_the_environment_of_a_real_cli_process(hub, adapter_dir) -> None:
    # The user's command line: the variable is read when huggingface_hub is imported, in a fresh process.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": hub.url}
    done = subprocess.run(
        [sys.executable, "-m", "lora_fusion_cli", "push", str(adapter_dir), "me/offline"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert lines[0].startswith("Error: HF_HUB_OFFLINE is set") and hub.requests == []


# --------------------------------------------------------------------------------------------- unchanged pushes


def test_unchanged_push_to_a_branch_says_so_and_returns_that_branchs_commit(hub, adapter_dir) -> None:
    first = push_folder(adapter_dir, "me/branches")
    assert isinstance(first, PushResult) and first.changed and first.revision == "main"
    main = hub.commit_sha("me/branches")
    assert first.commit == main and str(first) == f"{hub.url}/me/branches/commit/{main}"
    (adapter_dir / "notes.md").write_text("dev only\n")
    on_dev = push_folder(adapter_dir, "me/branches", revision="dev")
    dev = hub.commit_sha("me/branches", "dev")
    assert on_dev.changed and on_dev.commit == dev != main and on_dev.revision == "dev"
    branches = hub.branches("me/branches")

    again = push_folder(adapter_dir, "me/branches", revision="dev")
    assert not again.changed and again.commit == dev and again.revision == "dev"
    assert str(again) == f"{hub.url}/me/branches/commit/{dev}"  # a str, as before: the branch's commit URL
    assert again.summary.startswith(f"nothing changed: me/branches@dev already holds these files at commit {dev}")
    assert hub.branches("me/branches") == branches  # no commit was made, on any branch


def test_a_new_branch_from_main_with_the_same_files_is_unchanged_at_mains_commit(hub, adapter_dir) -> None:
    main = push_folder(adapter_dir, "me/same").commit
    result = push_folder(adapter_dir, "me/same", revision="v2")
    assert hub.branches("me/same") == {"main": main, "v2": main}
    assert not result.changed and result.commit == main and result.revision == "v2"


def test_cli_push_of_unchanged_files_to_a_branch_prints_that_branchs_commit(hub, adapter_dir) -> None:
    assert invoke("push", adapter_dir, "me/cli").exit_code == 0
    (adapter_dir / "notes.md").write_text("dev only\n")
    assert invoke("push", adapter_dir, "me/cli", "--revision", "dev").exit_code == 0
    dev, main = hub.commit_sha("me/cli", "dev"), hub.commit_sha("me/cli")
    again = invoke("push", adapter_dir, "me/cli", "--revision", "dev")
    assert again.exit_code == 0, again.output
    assert dev in again.stdout and main not in again.stdout
    assert hub.commit_sha("me/cli", "dev") == dev
