"""Tests for the FakeHub test server (tests/hub_server.py).

`test_fake_hub_raw_http` talks plain HTTP to the server, in process. `test_real_clients_against_fake_hub`
drives the real huggingface_hub / transformers / peft clients against it. Those read `HF_ENDPOINT` when
huggingface_hub is first imported, and other test modules import it too, so that check runs in a
subprocess that starts the hub, exports the environment, and only then imports the clients.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.hub_server import FakeHub, git_blob_sha

REPO_ROOT = Path(__file__).resolve().parent.parent


def _fetch(url: str, method: str = "GET", headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def test_fake_hub_raw_http() -> None:
    with FakeHub() as hub:
        first = hub.add_repo("org/model", {"config.json": b'{"a": 1}', "sub/w.bin": b"0123456789"})
        second = hub.add_repo("org/model", {"config.json": b'{"a": 2}'})
        assert len(first) == len(second) == 40 and first != second
        assert hub.commit_sha("org/model") == second
        assert hub.repo_files("org/model", first)["sub/w.bin"] == b"0123456789"
        assert hub.repo_files("org/model") == {"config.json": b'{"a": 2}'}

        status, headers, body = _fetch(f"{hub.url}/org/model/resolve/{first}/config.json")
        assert (status, body) == (200, b'{"a": 1}')
        assert headers["X-Repo-Commit"] == first
        assert headers["ETag"] == f'"{git_blob_sha(body)}"'
        status, headers, body = _fetch(f"{hub.url}/org/model/resolve/main/config.json", method="HEAD")
        assert (status, headers["Content-Length"], body) == (200, "8", b"")
        status, headers, body = _fetch(f"{hub.url}/org/model/resolve/{first}/sub/w.bin", headers={"Range": "bytes=2-4"})
        assert (status, headers["Content-Range"], body) == (206, "bytes 2-4/10", b"234")

        for path, code in [
            ("org/nope/resolve/main/config.json", "RepoNotFound"),
            ("org/model/resolve/main/nope.json", "EntryNotFound"),
            ("org/model/resolve/nope/config.json", "RevisionNotFound"),
        ]:
            status, headers, _ = _fetch(f"{hub.url}/{path}")
            assert (status, headers["X-Error-Code"]) == (404, code), path

        hub.required_token = "s3cret"
        hub.add_repo("solo", {"a.txt": b"a"}, private=True)
        status, headers, _ = _fetch(f"{hub.url}/solo/resolve/main/a.txt")
        assert (status, headers["X-Error-Code"]) == (401, "RepoNotFound")
        status, _, body = _fetch(f"{hub.url}/solo/resolve/main/a.txt", headers={"Authorization": "Bearer s3cret"})
        assert (status, body) == (200, b"a")

        hub.fail_next(429, count=2, path_contains="config.json")
        assert [_fetch(f"{hub.url}/org/model/resolve/main/config.json")[0] for _ in range(3)] == [429, 429, 200]
        assert _fetch(f"{hub.url}/api/agent-harnesses")[0] == 404

        hub.go_down()
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen(f"{hub.url}/org/model/resolve/main/config.json", timeout=5)
        hub.come_up()
        assert _fetch(f"{hub.url}/org/model/resolve/main/config.json")[0] == 200
        assert ("GET", "/org/model/resolve/main/config.json") in hub.requests

        hub.reset()
        assert hub.requests == [] and hub.required_token is None
        assert _fetch(f"{hub.url}/org/model/resolve/main/config.json")[0] == 404


# Runs in a fresh interpreter: argv[1] is a scratch directory.
_CLIENT_SCRIPT = textwrap.dedent(
    r'''
    import os, sys, time
    from pathlib import Path

    from tests.hub_server import FakeHub

    T0 = time.monotonic()
    tmp = Path(sys.argv[1])
    hub = FakeHub().start()
    # huggingface_hub reads these at import time: set them first.
    os.environ.update(
        HF_ENDPOINT=hub.url,
        HF_HOME=str(tmp / "hf_home"),
        HF_HUB_CACHE=str(tmp / "hub_cache"),
        HF_TOKEN="dummy-token",
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
    )

    import httpx2
    import huggingface_hub
    from huggingface_hub import HfApi, ModelCard, hf_hub_download, snapshot_download
    from huggingface_hub.errors import (
        EntryNotFoundError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError,
    )

    assert huggingface_hub.constants.ENDPOINT == hub.url
    api = HfApi()


    def raises(exc_type, fn, *args, **kwargs):
        try:
            fn(*args, **kwargs)
        except exc_type as err:
            return err
        raise AssertionError(f"{fn.__name__} did not raise {exc_type.__name__}")


    def resolve_gets(repo_id):
        return {path.split("/resolve/", 1)[1].split("/", 1)[1]
                for method, path in hub.requests if method == "GET" and path.startswith(f"/{repo_id}/resolve/")}


    # --- create_repo, upload_folder, model card ---------------------------------------------
    assert api.create_repo("org/demo").repo_id == "org/demo"
    assert api.create_repo("org/demo", exist_ok=True).repo_id == "org/demo"
    assert raises(HfHubHTTPError, api.create_repo, "org/demo").response.status_code == 409
    assert api.create_repo("bare").repo_id == "user/bare"  # bare names land in FakeHub.username
    api.create_repo("org/hidden", private=True)
    assert api.model_info("org/hidden").private is True

    folder = tmp / "upload"
    (folder / "weights").mkdir(parents=True)
    (folder / "notes.txt").write_text("v1\n")
    blob = os.urandom(200_000)
    (folder / "weights" / "blob.bin").write_bytes(blob)
    first = api.upload_folder(repo_id="org/demo", folder_path=folder)
    assert first.oid == hub.commit_sha("org/demo")
    ModelCard("---\nlicense: mit\ntags:\n- lora\n---\n# Demo\n").push_to_hub("org/demo")
    assert hub.repo_files("org/demo")["weights/blob.bin"] == blob
    assert ModelCard.load("org/demo").data.license == "mit"
    api.upload_file(path_or_fileobj=b"v2\n", path_in_repo="notes.txt", repo_id="org/demo")
    head = hub.commit_sha("org/demo")

    # --- branches ------------------------------------------------------------------------------
    api.create_branch("org/demo", branch="dev")
    assert raises(HfHubHTTPError, api.create_branch, "org/demo", branch="dev").response.status_code == 409
    api.create_branch("org/demo", branch="dev", exist_ok=True)
    api.upload_file(path_or_fileobj=b"dev\n", path_in_repo="dev.txt", repo_id="org/demo", revision="dev")
    assert sorted(api.list_repo_files("org/demo")) == ["README.md", "notes.txt", "weights/blob.bin"]
    assert "dev.txt" in api.list_repo_files("org/demo", revision="dev")
    assert [e.path for e in api.list_repo_tree("org/demo", path_in_repo="weights")] == ["weights/blob.bin"]

    # --- model_info, downloads ---------------------------------------------------------------
    info = api.model_info("org/demo")
    assert info.sha == head and {s.rfilename for s in info.siblings} == {"README.md", "notes.txt", "weights/blob.bin"}
    assert api.model_info("org/demo", revision="dev").sha == hub.commit_sha("org/demo", "dev")
    assert Path(hf_hub_download("org/demo", "notes.txt")).read_text() == "v2\n"
    assert Path(hf_hub_download("org/demo", "notes.txt", revision=first.oid)).read_text() == "v1\n"
    assert Path(hf_hub_download("org/demo", "dev.txt", revision="dev")).read_text() == "dev\n"
    assert Path(hf_hub_download("org/demo", "weights/blob.bin")).read_bytes() == blob
    hub.requests.clear()
    snap = Path(snapshot_download("org/demo", allow_patterns=["*.txt"], cache_dir=tmp / "snap_cache"))
    assert sorted(p.name for p in snap.rglob("*") if p.is_file()) == ["notes.txt"]
    assert resolve_gets("org/demo") == {"notes.txt"}, hub.requests

    # --- errors --------------------------------------------------------------------------------
    raises(RepositoryNotFoundError, hf_hub_download, "org/missing", "config.json")
    raises(RepositoryNotFoundError, api.model_info, "org/missing")
    err = raises(EntryNotFoundError, hf_hub_download, "org/demo", "missing.json")
    assert isinstance(err, HfHubHTTPError) and err.response.status_code == 404
    raises(RevisionNotFoundError, hf_hub_download, "org/demo", "notes.txt", revision="nope")
    raises(RevisionNotFoundError, api.model_info, "org/demo", revision="nope")

    # --- private repo + required token -------------------------------------------------------
    hub.required_token = "secret-token"
    hub.add_repo("org/private", {"config.json": b"{}"}, private=True)
    err = raises(RepositoryNotFoundError, hf_hub_download, "org/private", "config.json")
    assert err.response.status_code == 401
    assert Path(hf_hub_download("org/private", "config.json", token="secret-token")).read_bytes() == b"{}"
    assert api.model_info("org/private", token="secret-token").private is True
    err = raises(HfHubHTTPError, api.upload_file, path_or_fileobj=b"x", path_in_repo="x", repo_id="org/demo")
    assert err.response.status_code == 401 and not isinstance(err, RepositoryNotFoundError)
    assert raises(HfHubHTTPError, api.create_repo, "org/other").response.status_code == 401
    api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="org/private", token="secret-token")
    hub.required_token = None

    # --- injected faults -----------------------------------------------------------------------
    # hf_hub_download: a failed HEAD (no retry) is followed by a second metadata call with backoff.
    hub.requests.clear()
    hub.fail_next(500, path_contains="/resolve/")
    assert Path(hf_hub_download("org/demo", "notes.txt", cache_dir=tmp / "c500")).read_text() == "v2\n"
    assert [m for m, p in hub.requests].count("HEAD") == 2
    hub.fail_next(429, path_contains="/resolve/")
    assert Path(hf_hub_download("org/demo", "notes.txt", cache_dir=tmp / "c429")).read_text() == "v2\n"
    # model_info: a single plain request, no retry.
    hub.fail_next(500, path_contains="/api/models/org/demo")
    assert raises(HfHubHTTPError, api.model_info, "org/demo").response.status_code == 500
    # list_repo_files goes through http_backoff: retried (the client sleeps ~1 s before retrying).
    hub.fail_next(429, path_contains="/tree/")
    assert "notes.txt" in api.list_repo_files("org/demo")
    assert api.model_info("org/demo").sha == head

    # --- hub down ------------------------------------------------------------------------------
    hub.go_down()
    raises(httpx2.ConnectError, api.model_info, "org/demo")
    # Cached file + connection error: the client falls back to the cache.
    assert Path(hf_hub_download("org/demo", "notes.txt")).read_text() == "v2\n"
    hub.come_up()
    assert api.model_info("org/demo").sha == head
    T_HUB = time.monotonic() - T0

    # --- transformers + peft round trip --------------------------------------------------------
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=128, max_position_embeddings=64,
    )
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        base_logits = model(ids).logits
    model.push_to_hub("org/tiny")
    lora = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)).eval()
    with torch.no_grad():
        lora_logits = lora(ids).logits
    assert not torch.allclose(base_logits, lora_logits)
    lora.push_to_hub("org/lora")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(hub.repo_files("org/lora"))

    hub.requests.clear()
    base = AutoModelForCausalLM.from_pretrained("org/tiny").eval()
    with torch.no_grad():
        assert torch.equal(base(ids).logits, base_logits)
    reloaded = PeftModel.from_pretrained(base, "org/lora").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, lora_logits)
    assert resolve_gets("org/lora") <= {"adapter_config.json", "adapter_model.safetensors"}, hub.requests

    hub.stop()
    print(f"hub checks {T_HUB:.1f}s, total {time.monotonic() - T0:.1f}s")
    print("FAKEHUB-CLIENT-CHECKS-OK")
    '''
)


def test_real_clients_against_fake_hub(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-c", _CLIENT_SCRIPT, str(tmp_path)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    output = f"--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}"
    assert result.returncode == 0, output
    assert "FAKEHUB-CLIENT-CHECKS-OK" in result.stdout, output
