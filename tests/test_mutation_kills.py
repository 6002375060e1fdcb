"""Tests that kill mutants which survived `make mutation` (docs/testing.md), and the pytest plugin that run needs.

Each test checks observable behaviour of lora_fusion (a result, an error, a file), not the text of a mutant.

Plugin (`-p tests.test_mutation_kills`, set in pyproject's [tool.mutmut]): mutmut calls `pytest.main` many times
in one process and its forks. Each call runs the conftest's `pytest_configure` again, which starts the fake Hub on a
new port and a new cache and exports them as `HF_ENDPOINT` / `HF_HUB_CACHE`; but huggingface_hub read those variables
once, when the first run imported it. The hook below, run after the conftest's, points the already-imported
huggingface_hub at the new Hub and cache (a plain `pytest` run imports huggingface_hub only later: it does nothing).
"""

from __future__ import annotations

import os
import sys

import pytest


@pytest.hookimpl(trylast=True)
def pytest_configure(config: pytest.Config) -> None:
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is None or "HF_ENDPOINT" not in os.environ:
        return
    constants.ENDPOINT = os.environ["HF_ENDPOINT"].rstrip("/")
    constants.HUGGINGFACE_CO_URL_TEMPLATE = constants.ENDPOINT + "/{repo_id}/resolve/{revision}/{filename}"
    if "HF_HUB_CACHE" in os.environ:
        constants.HF_HUB_CACHE = constants.HUGGINGFACE_HUB_CACHE = os.environ["HF_HUB_CACHE"]
    hf_api = sys.modules.get("huggingface_hub.hf_api")
    if hf_api is not None:
        hf_api.api.endpoint = constants.ENDPOINT  # behind huggingface_hub.file_exists & co (PEFT calls them)
    http = sys.modules.get("huggingface_hub.utils._http")
    if http is not None:
        http.close_session()  # its connections went to the previous run's Hub


# ============================================================================================== tests
# (Imports below the plugin hook: pytest loads this module as a plugin before the conftest, and the hook needs none.)

import hashlib  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from lora_fusion import load_adapter  # noqa: E402
from lora_fusion.adapter import LoraAdapter, SourceInfo  # noqa: E402
from lora_fusion.errors import CorruptAdapterError, InvalidParameterError, UnsupportedAdapterError  # noqa: E402
from lora_fusion.hub import check_push_repo_id  # noqa: E402
from lora_fusion.spec import AdapterConfig, MemoryStore  # noqa: E402
from tests.test_properties import write_lora  # noqa: E402

SHAPES = {"model.layers.0.self_attn.q_proj": (16, 12), "model.layers.0.self_attn.v_proj": (16, 12)}
Q = "model.layers.0.self_attn.q_proj"


def small_lora(folder: Path, seed: int = 0) -> Path:
    return write_lora(folder, SHAPES, r=4, alpha=8, seed=seed)


def legacy_copy(source: Path, folder: Path, tensors: object = None, *, save=torch.save) -> Path:
    """`source` as a legacy adapter_model.bin (its tensors, or `tensors`) next to the same config."""
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_bytes((source / "adapter_config.json").read_bytes())
    save(load_file(source / "adapter_model.safetensors") if tensors is None else tensors, folder / "adapter_model.bin")
    return folder


def sha256_of(*files: Path) -> str:
    return hashlib.sha256(b"".join(file.read_bytes() for file in files)).hexdigest()


def empty_adapter(**provenance: object) -> LoraAdapter:
    config = AdapterConfig(base_model=None, task_type=None, r=1, lora_alpha=1)
    return LoraAdapter(config=config, modules={}, store=MemoryStore({}), provenance=provenance)


# --------------------------------------------------------------------------------------------- Hub repo ids


@pytest.mark.parametrize("repo_id", ["me/a..b", "me/model.git", "me/x--y"])
def test_push_repo_ids_the_hub_rejects_are_refused(repo_id: str) -> None:
    with pytest.raises(InvalidParameterError, match="owner/name"):
        check_push_repo_id(repo_id)


@pytest.mark.parametrize("repo_id", ["me/model.v2", "me/a.b-c_d", "org/git-tools", "me/model.gits"])
def test_push_repo_ids_the_hub_accepts_pass(repo_id: str) -> None:
    check_push_repo_id(repo_id)


# --------------------------------------------------------------------------------------------- legacy .bin files


def test_a_legacy_bin_saved_from_a_gpu_loads_on_the_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = small_lora(tmp_path / "a")

    def save_as_if_on_cuda(tensors: object, path: Path) -> None:
        with monkeypatch.context() as patch:  # the storages are recorded as living on cuda:0, as a GPU run saves them
            patch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
            torch.save(tensors, path)

    legacy = load_adapter(legacy_copy(source, tmp_path / "legacy", save=save_as_if_on_cuda))
    factors = legacy.factors(Q)
    assert factors.A.device.type == "cpu"
    assert torch.equal(legacy.delta(Q), load_adapter(source).delta(Q))


def test_a_legacy_bin_is_memory_mapped_not_read_whole(tmp_path: Path) -> None:
    weights = legacy_copy(small_lora(tmp_path / "a"), tmp_path / "legacy") / "adapter_model.bin"
    adapter = load_adapter(weights.parent)
    assert str(weights.resolve()) in Path("/proc/self/maps").read_text()
    del adapter


def test_a_pickle_payload_never_runs_even_when_the_environment_turns_torch_weights_only_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pickle

    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (marker.touch, ())

    folder = legacy_copy(small_lora(tmp_path / "a"), tmp_path / "hostile", {"x": Payload()}, save=lambda obj, path: path.write_bytes(pickle.dumps(obj)))
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # torch's default becomes a full unpickle
    with pytest.raises(CorruptAdapterError, match="never run"):
        load_adapter(folder)
    assert not marker.exists()


@pytest.mark.parametrize("content", [[torch.zeros(2, 2)], {"base_model.model.x.lora_A.weight": 3}], ids=["list", "int"])
def test_a_legacy_bin_that_is_not_a_map_of_tensors_is_refused(tmp_path: Path, content: object) -> None:
    folder = legacy_copy(small_lora(tmp_path / "a"), tmp_path / "odd", content)
    with pytest.raises(CorruptAdapterError, match="mapping of names to tensors"):
        load_adapter(folder)


def test_a_legacy_bin_of_integer_factors_is_refused_naming_the_dtype(tmp_path: Path) -> None:
    source = small_lora(tmp_path / "a")
    tensors = {key: (value * 100).to(torch.int64) for key, value in load_file(source / "adapter_model.safetensors").items()}
    with pytest.raises(UnsupportedAdapterError, match="int64"):
        load_adapter(legacy_copy(source, tmp_path / "ints", tensors))


# --------------------------------------------------------------------------------------------- provenance records


def test_a_single_weights_file_is_recorded_with_its_folder_and_the_hash_of_config_and_weights(tmp_path: Path) -> None:
    source = small_lora(tmp_path / "run-7")
    weights = source / "adapter_model.safetensors"
    record = load_adapter(weights).source.to_dict()
    assert record["source"] == "run-7/adapter_model.safetensors"
    assert record["sha256"] == sha256_of(source / "adapter_config.json", weights)


def test_a_provisional_record_holds_the_placeholder_only_while_the_hash_is_unfinished(tmp_path: Path) -> None:
    source = small_lora(tmp_path / "run-8")
    expected = sha256_of(source / "adapter_config.json", source / "adapter_model.safetensors")
    info = load_adapter(source).source
    assert info.to_dict(hash_placeholder="0" * 64)["sha256"] == "0" * 64  # not hashed yet: not waited for
    assert info.to_dict()["sha256"] == expected  # the final record waits for it
    assert info.to_dict(hash_placeholder="0" * 64)["sha256"] == expected  # known: the placeholder is not used
    hashing = load_adapter(source, hash_in_background=True).source
    assert hashing.to_dict()["sha256"] == expected  # hashed in the background, waited for
    assert hashing.to_dict(hash_placeholder="0" * 64)["sha256"] == expected


def test_a_subfolder_source_is_hashed_from_the_subfolders_files(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    small_lora(repo, seed=1)  # decoy files at the top
    inner = small_lora(repo / "adapters" / "b", seed=2)
    record = load_adapter(repo, subfolder="adapters/b").source.to_dict()
    assert record["source"] == "repo" and record["subfolder"] == "adapters/b"
    assert record["sha256"] == sha256_of(inner / "adapter_config.json", inner / "adapter_model.safetensors")


def test_the_hash_covers_the_weights_file_that_is_read_only(tmp_path: Path) -> None:
    source = small_lora(tmp_path / "both")
    legacy = legacy_copy(source, tmp_path / "legacy") / "adapter_model.bin"
    (source / "adapter_model.bin").write_bytes(legacy.read_bytes())  # a stale .bin beside the safetensors file
    record = load_adapter(source).source.to_dict()
    assert record["sha256"] == sha256_of(source / "adapter_config.json", source / "adapter_model.safetensors")


def test_a_local_source_is_named_by_its_folder(tmp_path: Path) -> None:
    record = load_adapter(small_lora(tmp_path / "math-lora")).source.to_dict()
    assert record["source"] == "math-lora" and record["commit"] is None


# --------------------------------------------------------------------------------------------- LoraAdapter


def test_local_inputs_list_the_fvae_and_support_files_of_the_provenance(tmp_path: Path) -> None:
    fvae, support = tmp_path / "fvae.pt", tmp_path / "support"
    fvae.write_bytes(b"x")
    support.mkdir()
    adapter = empty_adapter(params={"fvae": str(fvae), "support": str(support)}, base_model="org/base")
    assert adapter.local_inputs() == (fvae, support)


def test_a_base_model_id_too_long_for_a_path_is_no_local_input() -> None:
    assert empty_adapter(base_model="org/" + "x" * 5000).local_inputs() == ()
    assert empty_adapter(base_model="org/with\x00nul").local_inputs() == ()
    assert empty_adapter(base_model="", params={"fvae": ""}).local_inputs() == ()  # "" is no path (not ".")


def test_repr_names_the_source_or_the_method(tmp_path: Path) -> None:
    loaded = load_adapter(small_lora(tmp_path / "a"))
    assert repr(loaded) == f"LoraAdapter({str(tmp_path / 'a')!r}, modules=2, base_model='toy/base')"
    assert repr(empty_adapter(method="ties")) == "LoraAdapter('ties', modules=0, base_model=None)"
    assert repr(empty_adapter()) == "LoraAdapter('merged', modules=0, base_model=None)"


def test_push_to_hub_passes_every_option_on(monkeypatch: pytest.MonkeyPatch) -> None:
    import lora_fusion.writer

    calls = []
    monkeypatch.setattr(lora_fusion.writer, "push_adapter", lambda *args, **kwargs: calls.append((args, kwargs)) or "url")
    adapter = empty_adapter()
    options = {"private": True, "revision": "dev", "commit_message": "merge a and b", "token": "hf_x",
               "format": "diffusers"}
    assert adapter.push_to_hub("me/merged", **options) == "url"
    assert calls == [((adapter, "me/merged"), options)]


# --------------------------------------------------------------------------------------------- Hub downloads

TOKEN = "hf_mutationFAKEtoken0123456789abcdef"


def files_of(folder: Path, prefix: str = "") -> dict[str, bytes]:
    return {prefix + p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_private_legacy_adapter_on_a_branch_and_in_a_subfolder_loads_with_an_explicit_token(hub, tmp_path) -> None:
    local = legacy_copy(small_lora(tmp_path / "a", seed=3), tmp_path / "legacy")
    hub.required_token = TOKEN
    hub.add_repo("me/legacy", {"README.md": b"main holds no adapter"}, private=True)
    commit = hub.add_repo("me/legacy", files_of(local, "adapters/b/"), private=True, branch="v2")
    adapter = load_adapter("me/legacy@v2", subfolder="adapters/b", token=TOKEN)
    assert adapter.source.commit == commit and adapter.source.revision == "v2"
    assert torch.equal(adapter.delta(Q), load_adapter(local).delta(Q))


def test_a_private_safetensors_adapter_loads_with_an_explicit_token(hub, tmp_path) -> None:
    local = small_lora(tmp_path / "a", seed=4)
    hub.required_token = TOKEN
    hub.add_repo("me/private", files_of(local), private=True)
    assert torch.equal(load_adapter("me/private", token=TOKEN).delta(Q), load_adapter(local).delta(Q))


def test_the_weights_come_from_the_commit_the_config_came_from(hub, tmp_path, monkeypatch) -> None:
    import lora_fusion.formats.peft as peft

    first, second = small_lora(tmp_path / "a", seed=5), small_lora(tmp_path / "b", seed=6)
    commit = hub.add_repo("me/moving", files_of(first))
    download = peft.download_file

    def push_between_the_two_downloads(repo_id, filename, **kwargs):
        path = download(repo_id, filename, **kwargs)
        if filename == "adapter_config.json":
            hub.add_repo("me/moving", files_of(second))  # main moves on while the adapter is being fetched
        return path

    monkeypatch.setattr(peft, "download_file", push_between_the_two_downloads)
    adapter = load_adapter("me/moving")
    assert adapter.source.commit == commit
    assert torch.equal(adapter.delta(Q), load_adapter(first).delta(Q))


def test_a_hub_repo_without_weights_names_both_weights_files(hub, tmp_path) -> None:
    from lora_fusion.errors import NotALoraAdapterError

    hub.add_repo("me/config-only", {"adapter_config.json": (small_lora(tmp_path / "a") / "adapter_config.json").read_bytes()})
    with pytest.raises(NotALoraAdapterError) as caught:
        load_adapter("me/config-only")
    assert "me/config-only" in str(caught.value)
    assert "adapter_model.safetensors" in str(caught.value) and "adapter_model.bin" in str(caught.value)


@pytest.mark.parametrize("subfolder", [None, "adapters/b"])
def test_a_hub_repo_without_a_config_names_the_repo_and_subfolder(hub, subfolder) -> None:
    from lora_fusion.errors import NotALoraAdapterError

    hub.add_repo("me/model", {"config.json": b"{}", "adapters/b/config.json": b"{}"})
    with pytest.raises(NotALoraAdapterError) as caught:
        load_adapter("me/model", subfolder=subfolder)
    where = "me/model/adapters/b" if subfolder else "me/model"
    assert str(caught.value).startswith(f"{where} has no adapter_config.json")


def test_an_unknown_revision_is_named(hub, tmp_path) -> None:
    from lora_fusion.errors import SourceNotFoundError

    hub.add_repo("me/a", files_of(small_lora(tmp_path / "a")))
    with pytest.raises(SourceNotFoundError, match="revision 'nope' not found"):
        load_adapter("me/a@nope")


def test_hub_downloads_report_the_bytes_arriving_in_the_cache(hub, tmp_path, monkeypatch) -> None:
    import lora_fusion.hub as hub_module

    hub.add_repo("me/a", files_of(small_lora(tmp_path / "a")))
    progress = []
    call_hub = hub_module.call_hub
    monkeypatch.setattr(hub_module, "call_hub", lambda fn, **kwargs: progress.append(kwargs) or call_hub(fn, **kwargs))
    load_adapter("me/a")
    assert [kwargs["repo_id"] for kwargs in progress] == ["me/a", "me/a"]  # config, then weights
    weights = (tmp_path / "a" / "adapter_model.safetensors").stat().st_size
    assert all(kwargs["progress"]() >= weights for kwargs in progress)


def test_cache_progress_counts_the_bytes_in_the_repos_blobs_folder() -> None:
    from huggingface_hub import constants

    from lora_fusion.hub import cache_progress

    size = cache_progress("me/progress-test")
    assert size() == 0  # nothing downloaded yet: no folder
    blobs = Path(constants.HF_HUB_CACHE) / "models--me--progress-test" / "blobs"
    blobs.mkdir(parents=True)
    (blobs / "one").write_bytes(b"x" * 10)
    (blobs / "two.incomplete").write_bytes(b"y" * 5)
    assert size() == 15


def test_a_hub_that_hangs_is_given_up_after_the_limit_naming_the_repo(hub, tmp_path, monkeypatch) -> None:
    import threading
    import time

    from lora_fusion.errors import HubError

    monkeypatch.setenv("LORA_FUSION_HUB_TIMEOUT", "0.3")
    hub.add_repo("org/hangs", files_of(small_lora(tmp_path / "a")))
    hub.delay_next(1.0, 1, "adapter_config.json")
    start = time.monotonic()
    with pytest.raises(HubError, match=r"^org/hangs: the Hub did not answer for 0.3 s"):
        load_adapter("org/hangs")
    assert time.monotonic() - start < 0.95  # gave up before the Hub answered
    for thread in threading.enumerate():  # the abandoned download ends once the Hub answers
        if thread.name.startswith("lora-fusion-hub-"):
            thread.join(timeout=30)


# --------------------------------------------------------------------------------------------- call_hub, hub_timeout


def test_hub_timeout_accepts_fractions_of_a_second(monkeypatch) -> None:
    from lora_fusion.hub import hub_timeout

    monkeypatch.setenv("LORA_FUSION_HUB_TIMEOUT", "0.5")
    assert hub_timeout() == 0.5
    monkeypatch.delenv("LORA_FUSION_HUB_TIMEOUT")
    assert hub_timeout() == 60.0


def test_call_hub_runs_the_call_in_a_named_daemon_thread() -> None:
    import threading

    from lora_fusion.hub import call_hub

    name, daemon = call_hub(lambda: (threading.current_thread().name, threading.current_thread().daemon), repo_id="me/x")
    assert name == "lora-fusion-hub-me/x" and daemon is True


def test_call_hub_passes_errors_and_values_through() -> None:
    from lora_fusion.hub import call_hub

    assert call_hub(lambda: 7, repo_id="me/x", limit=5) == 7
    with pytest.raises(KeyError, match="boom"):
        call_hub(lambda: {}["boom"], repo_id="me/x", limit=5)


@pytest.mark.parametrize("progress", [None, lambda: 0], ids=["no-progress", "stalled"])
def test_call_hub_gives_up_at_its_own_limit(progress, monkeypatch) -> None:
    import time

    from lora_fusion.errors import HubError
    from lora_fusion.hub import call_hub

    monkeypatch.setenv("LORA_FUSION_HUB_TIMEOUT", "60")  # an explicit limit wins over the setting
    start = time.monotonic()
    with pytest.raises(HubError, match="me/x: the Hub did not answer for 0.2 s"):
        call_hub(lambda: time.sleep(1.5), repo_id="me/x", progress=progress, limit=0.2)
    assert time.monotonic() - start < 1.2


def test_call_hub_waits_for_a_silent_call_until_its_limit() -> None:
    import time

    from lora_fusion.hub import call_hub

    def quiet() -> str:
        time.sleep(1.2)  # silent past the first poll (1 s), done before the limit
        return "done"

    assert call_hub(quiet, repo_id="me/quiet", limit=1.6) == "done"


def test_call_hub_never_cuts_a_transfer_that_keeps_moving() -> None:
    import time

    from lora_fusion.hub import call_hub

    received = [0]

    def slow() -> str:
        for _ in range(12):  # 1.2 s in all, with bytes arriving every 0.1 s: six times the limit
            time.sleep(0.1)
            received[0] += 1
        return "done"

    assert call_hub(slow, repo_id="me/slow", progress=lambda: received[0], limit=0.2) == "done"


# --------------------------------------------------------------------------------------------- hub_error


def http_error(status: int):
    import httpx2 as httpx
    from huggingface_hub.errors import HfHubHTTPError

    request = httpx.Request("GET", "https://hub.test/api/models/me/x")
    return HfHubHTTPError(f"{status} error", response=httpx.Response(status, request=request))


@pytest.mark.parametrize(
    ("status", "fragment", "not_fragment"),
    [
        (401, "refused the credentials (401)", None),
        (403, "lacks permission (403)", None),
        (429, "rate-limiting requests (429)", None),
        (400, "the Hub answered 400; try again later", "server error"),
        (503, "the Hub answered 503 (a server error); try again later", None),
    ],
)
def test_http_errors_become_one_line_hub_errors_by_status(status, fragment, not_fragment) -> None:
    from lora_fusion.errors import HubError
    from lora_fusion.hub import hub_error

    error = hub_error(http_error(status), "me/x")
    assert isinstance(error, HubError) and str(error).startswith("me/x: ")
    assert fragment in str(error)
    assert not_fragment is None or not_fragment not in str(error)


def test_retried_http_errors_say_they_were_retried() -> None:
    from huggingface_hub.errors import LocalEntryNotFoundError

    from lora_fusion.hub import hub_error

    err = LocalEntryNotFoundError("not in the cache")
    err.__cause__ = http_error(503)
    assert "503 (a server error) after huggingface_hub's retries" in str(hub_error(err, "me/x"))


def test_unreachable_hub_errors_distinguish_timeouts_from_refusals() -> None:
    import httpx2 as httpx
    from huggingface_hub.errors import LocalEntryNotFoundError

    from lora_fusion.errors import HubError
    from lora_fusion.hub import hub_error

    timed_out = LocalEntryNotFoundError("not in the cache")
    timed_out.__cause__ = httpx.ConnectTimeout("timed out")
    refused = LocalEntryNotFoundError("not in the cache")
    refused.__cause__ = httpx.ConnectError("refused")
    assert "did not answer in time (ConnectTimeout" in str(hub_error(timed_out, "me/x"))
    message = str(hub_error(refused, "me/x"))
    assert "cannot reach the Hub" in message and "in time" not in message
    for err in (httpx.ConnectError("refused"), ConnectionRefusedError("refused")):
        translated = hub_error(err, "me/x")
        assert isinstance(translated, HubError), err
        assert f"could not be reached ({type(err).__name__})" in str(translated)


def test_other_errors_are_passed_through_unchanged() -> None:
    from lora_fusion.hub import hub_error

    for err in (ValueError("x"), RuntimeError("connection pool")):
        assert hub_error(err, "me/x") is err


# ============================================================================================== methods, linalg
# --------------------------------------------------------------------------------------------- the method registry


@pytest.fixture
def scratch_registry(monkeypatch):
    """Registrations made by a test land in a copy of the registry, dropped afterwards."""
    import lora_fusion.methods.base as base

    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))
    monkeypatch.setattr(base, "_ALIASES", dict(base._ALIASES))
    monkeypatch.setattr(base, "_PARAMS", dict(base._PARAMS))
    return base


def test_a_registered_method_is_found_by_name_and_alias_with_what_it_declared(scratch_registry) -> None:
    from lora_fusion.methods import get_method, list_methods, register_method
    from lora_fusion.methods.exact import LowRankParams

    def half(group, params):
        raise NotImplementedError

    def cost(module, params):
        raise NotImplementedError

    returned = register_method(
        "half", summary="s", formula="f", reference="r", params=LowRankParams, aliases=("halve", "h"),
        spaces=("core", "full"), output_rank="sum", uses_base=True, cost=cost,
    )(half)
    assert returned is half  # the decorator leaves the function as it was
    spec = get_method("half")
    assert get_method("halve") is spec and get_method("h") is spec and spec in list_methods()
    assert (spec.name, spec.fn, spec.summary, spec.formula, spec.reference) == ("half", half, "s", "f", "r")
    rank_rules = {"rank", "energy", "sv_fro", "sv_ratio", "sv_cumulative", "max_rank"}
    assert set(spec.declared) == {"scale", *rank_rules} and spec.aliases == ("halve", "h")
    assert spec.spaces == ("core", "full") and spec.cost is cost
    assert (spec.output_rank, spec.uses_base, spec.kind) == ("sum", True, "module")
    with pytest.raises(ValueError, match="already registered"):
        register_method("h", summary="s", formula="f", reference="r")(half)


def test_a_method_registered_without_options_gets_the_documented_defaults(scratch_registry) -> None:
    from lora_fusion.methods import NoParams, factored_cost, get_method, register_method

    register_method("plain", summary="s", formula="f", reference="r")(lambda group, params: None)
    spec = get_method("plain")
    assert spec.params is NoParams and spec.declared == {} and spec.aliases == ()
    assert (spec.spaces, spec.output_rank, spec.uses_base, spec.kind, spec.cost) == (
        ("full",), "max", False, "module", factored_cost
    )


def test_an_adapter_method_is_registered_as_its_kind(scratch_registry) -> None:
    from lora_fusion.methods import get_method, register_method
    from lora_fusion.methods.icm import IcmParams

    def fuse(adapters, params):
        raise NotImplementedError

    assert register_method("fuse", summary="s", formula="f", reference="r", params=IcmParams, kind="adapters",
                           output_rank="merged")(fuse) is fuse
    spec = get_method("fuse")
    assert (spec.name, spec.fn, spec.kind, spec.output_rank) == ("fuse", fuse, "adapters", "merged")
    with pytest.raises(InvalidParameterError, match="needs --fvae"):
        spec.resolve({"support": "s"})


def test_a_parameter_name_has_one_meaning_across_methods(scratch_registry) -> None:
    from dataclasses import dataclass

    from lora_fusion.methods import register_method
    from lora_fusion.params import MethodParams, Param

    @dataclass(frozen=True)
    class Other(MethodParams):
        rank: int = Param("another rank", "anything", lambda value: True).field(3)

    with pytest.raises(ValueError, match="'rank' of other is already declared by"):
        register_method("other", summary="s", formula="f", reference="r", params=Other)(lambda group, params: None)


def test_element_wise_methods_share_one_registration_form(scratch_registry) -> None:
    from lora_fusion.methods import get_method
    from lora_fusion.methods.interference import CrumbsParams, _register, elementwise_cost

    def trimmed(group, params):
        raise NotImplementedError

    assert _register("trimmed", summary="s", formula="f", reference="r", params=CrumbsParams)(trimmed) is trimmed
    spec = get_method("trimmed")
    assert (spec.fn, spec.summary, spec.formula, spec.reference) == (trimmed, "s", "f", "r")
    rank_rules = {"rank", "energy", "sv_fro", "sv_ratio", "sv_cumulative", "max_rank"}
    assert set(spec.declared) == {"scale", "density", *rank_rules, "seed", "space", "svd", "gamma"}
    assert spec.describe()["density"]["default"] == 0.9 and spec.spaces == ("full", "core")
    assert spec.cost is elementwise_cost
    assert set(get_method("ties").declared) == {"scale", "density", *rank_rules, "seed", "space", "svd", "majority"}


# --------------------------------------------------------------------------------------------- numerical rank


def test_numerical_rank_counts_singular_values_above_a_millionth_of_the_largest() -> None:
    from lora_fusion.methods.subspace import numerical_rank

    def rank(*values: float) -> int:
        return numerical_rank(torch.tensor(values, dtype=torch.float64))

    assert rank(1.0, 1e-6) == 1  # exactly at the tolerance: a numerical zero
    assert rank(4.0, 1e-6) == 1 and rank(4.0, 5e-6) == 2
    assert rank(4.0, 2.0, 1.0) == 3 and rank(0.5, 0.25) == 2
    assert rank(4.0, 0.0) == 1 and rank(0.0, 0.0) == 0 and rank() == 0
    assert numerical_rank(torch.tensor([4.0, 0.5], dtype=torch.float64), tolerance=0.2) == 1


# --------------------------------------------------------------------------------------------- the randomized SVD's bound


def excess_bound_by_the_formula(S: list[float], rank: int, width: int, q: int) -> float:
    """The docstring's formula, term by term in Python floats."""
    if width < rank + 2 or rank > len(S) or S[rank - 1] == 0.0:
        return math.inf
    whole = sum(s**2 for s in S)
    tail = sum(s**2 for s in S[rank:])
    head = sum(s ** (-4 * q) for s in S[:rank])
    missed = min(
        head * sum(s ** (4 * q + 2) for s in S[h:]) / (width - h - 1) for h in range(rank, min(width - 2, len(S)) + 1)
    )
    return (math.sqrt(tail + missed) - math.sqrt(tail)) / math.sqrt(whole)


@pytest.mark.parametrize(
    ("S", "rank", "width", "q"),
    [
        ([3.0, 2.0, 1.5, 1.0, 0.8, 0.5, 0.3, 0.2], 2, 6, 2),
        ([3.0, 2.0, 1.5, 1.0, 0.8, 0.5, 0.3, 0.2], 3, 5, 1),  # width = rank + 2: one h only
        ([1.0, 0.9, 0.8, 0.7, 0.6], 2, 30, 2),  # a sketch wider than the spectrum: h runs to the end
        ([2.0, 1.0, 0.5], 3, 9, 0),
        ([1.0] * 20, 2, 12, 1),  # flat: the best h has width − h − 1 > 1, and smaller h would be better still
    ],
)
def test_the_randomized_excess_bound_is_its_formula(S, rank, width, q) -> None:
    from lora_fusion.linalg import randomized_excess_bound

    expected = excess_bound_by_the_formula(S, rank, width, q)
    assert math.isfinite(expected)
    got = randomized_excess_bound(torch.tensor(S, dtype=torch.float64), rank=rank, width=width, power_iterations=q)
    assert got == pytest.approx(expected, rel=1e-9)


def test_the_randomized_excess_bound_is_infinite_where_it_does_not_apply() -> None:
    from lora_fusion.linalg import POWER_ITERATIONS, randomized_excess_bound

    S = torch.tensor([3.0, 2.0, 1.0, 0.0, 0.0])
    assert randomized_excess_bound(S, rank=2, width=3) == math.inf  # width < rank + 2
    assert randomized_excess_bound(S, rank=6, width=20) == math.inf  # more components than values
    assert randomized_excess_bound(S, rank=4, width=20) == math.inf  # σ_R = 0
    assert math.isfinite(randomized_excess_bound(S, rank=3, width=5))
    assert randomized_excess_bound(S[:3], rank=3, width=5) == pytest.approx(
        excess_bound_by_the_formula([3.0, 2.0, 1.0], 3, 5, POWER_ITERATIONS), abs=1e-12
    )


# --------------------------------------------------------------------------------------------- element-wise selection


def test_ties_at_the_threshold_that_end_exactly_at_a_block_boundary_keep_the_first_block() -> None:
    from lora_fusion.methods.elementwise import _CPU_BLOCK, DenseTask, Scratch, TopMagnitude

    task = DenseTask.of(torch.ones(4, _CPU_BLOCK // 2))  # two blocks of two rows, every entry tied
    selection = TopMagnitude.of(task, _CPU_BLOCK)
    assert selection == TopMagnitude(1.0, _CPU_BLOCK)
    scratch = Scratch(1, _CPU_BLOCK, task.device, task.dtype)
    kept = [float(selection.kept(block.abs(), offset, scratch.kept[: block.numel()]).sum())
            for offset, block in task.blocks(scratch.tasks[0])]
    assert kept == [_CPU_BLOCK, 0.0]


def test_a_dense_task_takes_any_contiguous_tensor_of_one_dimension_or_more() -> None:
    from lora_fusion.methods.elementwise import DenseTask

    assert DenseTask.of(torch.ones(5)).shape == (5, 1)
    assert DenseTask.of(torch.ones(2, 3, 4)).shape == (2, 12)
    for bad in (torch.tensor(1.0), torch.ones(3, 4).mT):
        with pytest.raises(ValueError, match="contiguous tensor of at least one dimension"):
            DenseTask.of(bad)


# --------------------------------------------------------------------------------------------- subspace methods


def rank_one_group(name: str = "m", scale: float = 1.0):
    from lora_fusion.adapter import ModuleFactors
    from lora_fusion.methods.base import ModuleGroup

    g = torch.Generator().manual_seed(7)
    factors = [ModuleFactors(A=torch.randn(1, 12, generator=g), B=torch.randn(16, 1, generator=g), scale=scale)]
    return ModuleGroup(name=name, factors=factors, weights=[1.0])


def two_adapter_group():
    from lora_fusion.adapter import ModuleFactors
    from lora_fusion.methods.base import ModuleGroup

    g = torch.Generator().manual_seed(8)
    factors = [ModuleFactors(A=torch.randn(4, 12, generator=g), B=torch.randn(16, 4, generator=g), scale=0.5)
               for _ in range(2)]
    return ModuleGroup(name="m", factors=factors, weights=[1.0, 0.5])


@pytest.mark.parametrize("method", ["tsv", "iso_c", "iso_cts", "knots"])
def test_subspace_methods_keep_the_merged_rank_unless_a_rank_or_energy_is_asked_for(method: str) -> None:
    from lora_fusion.methods import get_method

    spec = get_method(method)
    assert spec.fn(rank_one_group(), spec.resolve({})).stats.rank == 1  # a rank-1 update stays rank 1
    group = two_adapter_group()
    whole = spec.fn(group, spec.resolve({}))
    assert whole.stats.rank > 2
    assert spec.fn(group, spec.resolve({"rank": 2})).stats.rank == 2
    by_energy = spec.fn(group, spec.resolve({"energy": 0.5}))
    assert 1 <= by_energy.stats.rank < whole.stats.rank and by_energy.stats.retained_energy >= 0.5


def test_method_help_shows_each_methods_own_defaults() -> None:
    from lora_fusion.methods import get_method

    described = get_method("ties").describe()
    assert described["density"]["default"] == 0.2 and described["majority"]["default"] == "total"
    assert "Fraction of entries kept" in described["density"]["help"]
    assert get_method("breadcrumbs").describe()["density"]["default"] == 0.9


# --------------------------------------------------------------------------------------------- RAPF


def canonical_fusion(old: torch.Tensor, new: torch.Tensor, bias: float) -> torch.Tensor:
    """docs/rapf.md written out: U = [U₁ | U₂] (W_o's singular vectors above 1e-6·σ₁, then those of the residual of
    the change above 1e-6·‖change‖), C = Uᵀ(W_n − W_o), W = W_o + U·(M ⊙ C)."""
    W_o, change = old.double(), new.double() - old.double()
    U, S, _ = torch.linalg.svd(W_o)
    U1 = U[:, : int((S > 1e-6 * S[0]).sum())]
    residual = change - U1 @ (U1.mT @ change)
    R, S_r, _ = torch.linalg.svd(residual)
    basis = torch.cat([U1, R[:, : int((S_r > 1e-6 * torch.linalg.matrix_norm(change)).sum())]], dim=1)
    C = basis.mT @ change
    return W_o + basis @ (torch.clamp(C.abs() / C.abs().max() + bias, max=1.0) * C)


def test_rapf_fusion_is_unchanged_by_the_scale_of_the_weights() -> None:
    from lora_fusion.methods.rapf import rapf_fuse_weights

    g = torch.Generator().manual_seed(3)
    old = torch.randn(12, 12, generator=g, dtype=torch.float64)
    new = old + 0.3 * torch.randn(12, 12, generator=g, dtype=torch.float64)
    for c in (1e-3, 1.0, 1e3):  # singular values all below 1, around 1, all above 1
        torch.testing.assert_close(rapf_fuse_weights(c * old, c * new, bias=0.3), c * rapf_fuse_weights(old, new, bias=0.3))


@pytest.mark.parametrize(
    ("shape", "diagonal"),
    [((6, 6), (2.0, 0.5)), ((9, 4), (2.0, 0.5)), ((6, 6), (3.0, 1e-7)), ((6, 6), (3.0,)), ((5, 5), ())],
    ids=["square", "tall", "nearly-rank-1", "rank-1", "zero"],
)
def test_rapf_fusion_of_a_rank_deficient_weight_uses_the_canonical_completion(shape, diagonal) -> None:
    from lora_fusion.methods.rapf import rapf_fuse_weights

    g = torch.Generator().manual_seed(4)
    m, n = shape
    old = torch.zeros(m, n, dtype=torch.float64)
    for i, value in enumerate(diagonal):  # exact zeros elsewhere
        old[i, i] = value
    new = old + torch.randn(m, n, generator=g, dtype=torch.float64)
    for bias in (0.0, 0.5):
        torch.testing.assert_close(rapf_fuse_weights(old, new, bias=bias), canonical_fusion(old, new, bias))
    fused = rapf_fuse_weights(old.float(), new.float(), bias=0.5)
    assert fused.dtype == torch.float32  # in the input's dtype
    raw = rapf_fuse_weights(old.float(), new.float(), bias=0.5, basis="raw")
    assert raw.dtype == torch.float32 and not torch.equal(raw, fused)


def test_rapf_bias_must_be_a_fraction() -> None:
    from lora_fusion.methods.rapf import rapf_fuse_weights

    old = torch.eye(3, dtype=torch.float64)
    rapf_fuse_weights(old, 2 * old, bias=1.0)
    for bias in (-0.1, 1.5):
        with pytest.raises(ValueError, match="bias must be in"):
            rapf_fuse_weights(old, 2 * old, bias=bias)


def test_the_fusion_mask_of_no_change_is_the_floor() -> None:
    from lora_fusion.methods.rapf import fusion_mask

    torch.testing.assert_close(fusion_mask(torch.zeros(2, 3), 0.6), torch.full((2, 3), 0.6))
    assert fusion_mask(torch.zeros(0, 3), 0.6).shape == (0, 3)
    torch.testing.assert_close(fusion_mask(torch.tensor([[2.0, -1.0]]), 0.25), torch.tensor([[1.0, 0.75]]))


# --------------------------------------------------------------------------------------------- top-k of large updates


def reference_selection(values: torch.Tensor, keep: int) -> torch.Tensor:
    """The `keep` largest |values|, ties by lower flat index, as a 0/1 float mask of the flat tensor."""
    order = torch.sort(values.abs().reshape(-1), descending=True, stable=True).indices
    mask = torch.zeros(values.numel())
    mask[order[:keep]] = 1.0
    return mask


def selected(task, keep: int) -> torch.Tensor:
    from lora_fusion.methods.elementwise import Scratch, TopMagnitude, block_entries

    selection = TopMagnitude.of(task, keep)
    scratch = Scratch(1, block_entries(task.shape, task.device), task.device, task.dtype)
    return torch.cat([selection.kept(block.abs(), offset, scratch.kept[: block.numel()]).clone()
                      for offset, block in task.blocks(scratch.tasks[0])])


@pytest.mark.parametrize(
    ("levels", "keep"),
    # 81 magnitudes: the bracket holds one value (keep 306_073: exactly every entry of |τ| ≥ 30); 1001: several
    [(40, 1), (40, 5_000), (40, 300_000), (40, 306_073), (40, 1_100_000), (40, 1_126_399), (1000, 300_000), (1000, 700_000)],
)
def test_the_sampled_top_k_of_a_large_update_with_many_ties_is_exact(levels: int, keep: int) -> None:
    from lora_fusion.methods.elementwise import DenseTask

    g = torch.Generator().manual_seed(11 if levels == 40 else 13)
    values = torch.randint(-levels, levels + 1, (1100, 1024), generator=g).float()  # 1.1 M entries, many ties
    mask = selected(DenseTask.of(values), keep)
    assert float(mask.sum()) == keep
    assert torch.equal(mask, reference_selection(values, keep))


@pytest.mark.parametrize("keep", [20_000, 600_000])
def test_the_sampled_top_k_of_a_sparse_large_update_is_exact(keep: int) -> None:
    from lora_fusion.methods.elementwise import DenseTask

    g = torch.Generator().manual_seed(12)
    values = torch.randn(1100, 1024, generator=g) * (torch.rand(1100, 1024, generator=g) < 0.05)  # 95% zeros
    mask = selected(DenseTask.of(values), keep)
    assert float(mask.sum()) == keep
    assert torch.equal(mask, reference_selection(values, keep))


def test_counting_a_mask_is_exact_beyond_float32s_integers() -> None:
    from lora_fusion.methods.elementwise import _count

    assert _count(torch.ones(1 << 24)) == 1 << 24
    assert _count(torch.ones((1 << 24) + 3)) == (1 << 24) + 3  # a float32 sum says 2²⁴ + 4


def test_ties_of_a_single_adapter_is_its_trimmed_update() -> None:
    from lora_fusion.adapter import ModuleFactors
    from lora_fusion.methods import get_method
    from lora_fusion.methods.base import ModuleGroup

    g = torch.Generator().manual_seed(9)
    f = ModuleFactors(A=torch.randn(3, 10, generator=g), B=torch.randn(8, 3, generator=g), scale=2.0)
    dense = f.delta()
    kept = reference_selection(dense, int(0.5 * dense.numel())).reshape(dense.shape)
    for majority in ("total", "frequency"):
        spec = get_method("ties")
        result = spec.fn(ModuleGroup("m", [f], [0.5]), spec.resolve({"density": 0.5, "majority": majority, "rank": 8}))
        torch.testing.assert_close(result.B @ result.A, 0.5 * dense * kept, atol=1e-5, rtol=1e-5)


def test_save_pretrained_refuses_an_existing_folder_by_default(tmp_path: Path) -> None:
    from lora_fusion.errors import OutputExistsError

    adapter = load_adapter(small_lora(tmp_path / "a"))
    (tmp_path / "out").mkdir()
    with pytest.raises(OutputExistsError):
        adapter.save_pretrained(tmp_path / "out")
    assert adapter.save_pretrained(tmp_path / "out", overwrite=True) == tmp_path / "out"


# ============================================================================================== writer
# --------------------------------------------------------------------------------------------- what --overwrite refuses


def test_special_folders_are_refused_naming_why(tmp_path: Path, monkeypatch) -> None:
    from lora_fusion.errors import OutputProtectedError
    from lora_fusion.writer import check_output_folder

    def reason(folder: Path) -> str:
        with pytest.raises(OutputProtectedError) as caught:
            check_output_folder(folder, overwrite=True)
        assert f": {caught.value.reason}" in str(caught.value)
        assert str(caught.value).endswith(". Choose another --out, e.g. a new folder.")
        return caught.value.reason

    (tmp_path / "w" / "cwd").mkdir(parents=True)
    (tmp_path / "h" / "home").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "w" / "cwd")
    monkeypatch.setenv("HOME", str(tmp_path / "h" / "home"))
    assert reason(Path("/")) == "it is the root folder"
    assert reason(tmp_path / "w" / "cwd") == "it is the current directory"
    assert reason(tmp_path / "w") == "it contains the current directory"
    assert reason(tmp_path / "h" / "home") == "it is the home folder"
    assert reason(tmp_path / "h") == "it contains the home folder"


@pytest.mark.parametrize("first", ["org/hub-lora@main", "bad\x00name", "x" * 5000], ids=["hub-id", "nul", "too-long"])
def test_inputs_after_a_non_local_one_are_still_protected(tmp_path: Path, first: str) -> None:
    from lora_fusion.errors import OutputProtectedError
    from lora_fusion.writer import check_output_folder

    source = small_lora(tmp_path / "source")
    with pytest.raises(OutputProtectedError, match="it is the input") as caught:
        check_output_folder(source, overwrite=True, protected=[first, str(source)])
    assert str(caught.value).endswith(". Choose an --out outside the inputs.")


def test_a_readme_that_is_not_our_card_blocks_overwriting(tmp_path: Path) -> None:
    from lora_fusion.errors import OutputProtectedError
    from lora_fusion.writer import CARD_TITLE, check_output_folder

    folder = tmp_path / "out"
    folder.mkdir()
    card = folder / "README.md"
    title = f"\n{CARD_TITLE}\n"
    for text in (b"notes \xff\xfe not utf-8\n", ("x" * 5000 + title).encode(), ("x" * (4097 - len(title)) + title).encode()):
        card.write_bytes(text)  # invalid UTF-8; our title, but past the first 4096 characters
        with pytest.raises(OutputProtectedError, match="holds files lora-fusion did not write"):
            check_output_folder(folder, overwrite=True)
    card.write_text("x" * (4096 - len(title)) + title)  # our title, ending at the 4096th character
    check_output_folder(folder, overwrite=True)


# --------------------------------------------------------------------------------------------- staging folders


def test_a_write_removes_the_staging_folders_of_dead_writers_of_this_host_only(tmp_path: Path) -> None:
    import subprocess
    import sys

    from lora_fusion.writer import _HOST, write_adapter

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    writer = subprocess.Popen(["sleep", "60"])  # a writer still at work
    out = tmp_path / "out"
    stages = {
        "dead": tmp_path / f".out.0123abcd-{dead_pid}-{_HOST}.incomplete",
        "alive": tmp_path / f".out.0123abcd-{writer.pid}-{_HOST}.incomplete",
        "other-host": tmp_path / f".out.0123abcd-{dead_pid}-ffffff.incomplete",
        "short-tag": tmp_path / f".out.0123abc-{dead_pid}-{_HOST}.incomplete",
        "not-a-pid": tmp_path / f".out.0123abcd-12x4-{_HOST}.incomplete",
        "other-output": tmp_path / f".outer.0123abcd-{dead_pid}-{_HOST}.incomplete",
        "extra-dash": tmp_path / f".out.0123abcd-{dead_pid}-2-{_HOST}.incomplete",
        "dash-in-tag": tmp_path / f".out.abc-defg-{dead_pid}-{_HOST}.incomplete",
    }
    for stage in stages.values():
        stage.mkdir()
        (stage / "adapter_model.safetensors").write_bytes(b"partial")
    try:
        write_adapter(load_adapter(small_lora(tmp_path / "a")), out)
        assert writer.poll() is None  # only looked at, never signalled
    finally:
        writer.kill()
        writer.wait()
    assert {name for name, stage in stages.items() if stage.exists()} == set(stages) - {"dead"}


# --------------------------------------------------------------------------------------------- pushes


def test_push_adapter_passes_every_option_on(monkeypatch, tmp_path: Path) -> None:
    import lora_fusion.writer as writer

    calls = []

    def record(folder, repo_id, **kwargs):
        calls.append((sorted(p.name for p in Path(folder).iterdir()), repo_id, kwargs))
        return "url"

    monkeypatch.setattr(writer, "push_folder", record)
    options = {"private": True, "revision": "dev", "commit_message": "merge a and b", "token": "hf_x"}
    assert writer.push_adapter(load_adapter(small_lora(tmp_path / "a")), "me/merged", **options) == "url"
    assert calls == [(["README.md", "adapter_config.json", "adapter_model.safetensors"], "me/merged", options)]


def test_push_folder_titles_the_commit(hub, tmp_path: Path, monkeypatch) -> None:
    from huggingface_hub import HfApi

    from lora_fusion.hub import push_folder

    titles = []
    upload = HfApi.upload_folder

    def recording_upload(self, **kwargs):
        titles.append(kwargs["commit_message"])
        return upload(self, **kwargs)

    monkeypatch.setattr(HfApi, "upload_folder", recording_upload)
    folder = small_lora(tmp_path / "a")
    push_folder(folder, "me/titled", commit_message="merge a and b")
    push_folder(small_lora(tmp_path / "b", seed=1), "me/titled")
    assert titles == ["merge a and b", "Upload LoRA adapter merged with lora-fusion"]


def test_a_dangling_link_in_a_folder_to_push_is_refused(hub, tmp_path: Path) -> None:
    from lora_fusion.hub import push_folder

    folder = small_lora(tmp_path / "a")
    (folder / "notes.md").symlink_to(folder / "missing.md")  # would point inside, but leads nowhere
    with pytest.raises(CorruptAdapterError, match="broken or looping link"):
        push_folder(folder, "me/dangling")
    assert not [path for method, path in hub.requests if method == "POST"]


def test_a_push_may_take_the_hub_timeout_plus_the_folders_size_at_100_kb_per_second(hub, tmp_path, monkeypatch) -> None:
    import threading

    from lora_fusion.errors import HubError
    from lora_fusion.hub import push_folder

    monkeypatch.setenv("LORA_FUSION_HUB_TIMEOUT", "0.2")
    folder = small_lora(tmp_path / "a")
    (folder / "padding.bin").write_bytes(b"\0" * 30_000)  # with the adapter: 0.3 s and more at 100 kB/s
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    hub.delay_next(1.2, 1, "/api/repos/create")
    with pytest.raises(HubError, match=rf"^me/slow: the Hub did not answer for {0.2 + size / 100_000:.3g} s"):
        push_folder(folder, "me/slow")
    hub.clear_faults()
    for thread in threading.enumerate():
        if thread.name.startswith("lora-fusion-hub-"):
            thread.join(timeout=30)


def test_adapter_only_rapf_steps_are_cut_to_the_fused_updates_numerical_rank() -> None:
    from lora_fusion.methods.rapf import fuse_update_factored

    g = torch.Generator().manual_seed(5)
    b, a = torch.randn(10, 1, generator=g), torch.randn(1, 8, generator=g)
    B, A = fuse_update_factored((b, a), (2 * b, a), bias=0.5)  # the same direction twice: F stays rank 1
    assert B.shape == (10, 1) and A.shape == (1, 8)
    B, A = fuse_update_factored((b, a), (torch.randn(10, 1, generator=g), torch.randn(1, 8, generator=g)), bias=0.5)
    assert B.shape == (10, 2) and A.shape == (2, 8)


# --------------------------------------------------------------------------------------------- written files


def test_the_weights_file_says_it_holds_pytorch_tensors(tmp_path: Path) -> None:
    from safetensors import safe_open

    out = load_adapter(small_lora(tmp_path / "a")).save_pretrained(tmp_path / "out")
    with safe_open(str(out / "adapter_model.safetensors"), framework="pt") as file:
        assert file.metadata()["format"] == "pt"  # transformers refuses a checkpoint without it


def test_the_provenance_metadata_does_not_depend_on_the_order_it_was_assembled_in(tmp_path: Path) -> None:
    source = load_adapter(small_lora(tmp_path / "a"))
    tensors = {key: source._store.read(key) for spec in source.modules.values() for key in (spec.a_key, spec.b_key)}
    provenance = {"method": "linear", "params": {"scale": 1.0, "rank": 4}, "sources": [{"source": "a", "weight": 1.0}]}
    reordered = {"sources": provenance["sources"], "params": {"rank": 4, "scale": 1.0}, "method": "linear"}
    written = []
    for record, out in ((provenance, tmp_path / "one"), (reordered, tmp_path / "two")):
        adapter = LoraAdapter(config=source.config, modules=source.modules, store=MemoryStore(tensors), provenance=record)
        written.append((adapter.save_pretrained(out) / "adapter_model.safetensors").read_bytes())
    assert written[0] == written[1]


def test_a_full_disk_while_writing_the_weights_is_one_plain_error(tmp_path: Path, monkeypatch) -> None:
    import lora_fusion.formats.stores as stores
    from lora_fusion.errors import OutputWriteError

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    adapter = load_adapter(small_lora(tmp_path / "a"))
    monkeypatch.setattr(stores, "write_tensor_bytes", full_disk)
    with pytest.raises(OutputWriteError) as caught:
        adapter.save_pretrained(tmp_path / "out")
    assert str(caught.value) == f"could not write {tmp_path / 'out'}: No space left on device; nothing was written."
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == ["a"]


# --------------------------------------------------------------------------------------------- merge parameters

ACCEPTED = [
    {}, {"rank": 1}, {"energy": 1.0}, {"energy": 1}, {"energy": 1e-9}, {"scale": -2.0}, {"scale": 0.0},
    {"density": 1.0}, {"density": 1}, {"density": 1e-9}, {"majority": "frequency"}, {"gamma": 0.0}, {"gamma": 0.999},
    {"seed": 0}, {"seed": 2**40}, {"common_fraction": 1.0}, {"common_fraction": 1e-9}, {"space": "core"},
    {"svd": "exact"}, {"svd": "randomized"}, {"svd": "auto", "space": "core"}, {"bias": 0.0}, {"bias": 1.0},
    {"bias": 1}, {"chained": True}, {"fvae": "f"}, {"support": "s"}, {"budget": 1}, {"optimizer": "gradient"},
    {"optimizer": "gradient-free"}, {"per_group": True}, {"penalty": 0.0}, {"penalty": 1},
]
REFUSED = [
    ({"rank": 0}, "rank"), ({"rank": True}, "rank"), ({"rank": 2.0}, "rank"), ({"rank": -1}, "rank"),
    ({"energy": 0.0}, "energy"), ({"energy": 1.0001}, "energy"), ({"energy": "0.9"}, "energy"),
    ({"rank": 4, "energy": 0.9}, "rank"), ({"scale": math.inf}, "scale"), ({"scale": math.nan}, "scale"),
    ({"density": 0.0}, "density"), ({"density": 1.5}, "density"), ({"density": True}, "density"),
    ({"density": math.nan}, "density"), ({"majority": "mass"}, "majority"), ({"gamma": 1.0}, "gamma"),
    ({"gamma": -0.1}, "gamma"), ({"gamma": math.inf}, "gamma"), ({"seed": -1}, "seed"), ({"seed": True}, "seed"),
    ({"seed": 1.0}, "seed"), ({"common_fraction": 0.0}, "common_fraction"), ({"common_fraction": 1.2}, "common_fraction"),
    ({"space": "dense"}, "space"), ({"svd": "fast"}, "svd"), ({"svd": "exact", "space": "core"}, "svd"),
    ({"svd": "randomized", "space": "core"}, "svd"), ({"bias": -0.01}, "bias"), ({"bias": 1.01}, "bias"),
    ({"bias": False}, "bias"), ({"chained": 1}, "chained"), ({"fvae": 3}, "fvae"), ({"support": 1.5}, "support"),
    ({"budget": 0}, "budget"), ({"budget": 2.0}, "budget"), ({"budget": True}, "budget"),
    ({"optimizer": "nevergrad"}, "optimizer"), ({"per_group": 1}, "per_group"), ({"penalty": -0.01}, "penalty"),
    ({"penalty": math.inf}, "penalty"), ({"penalty": True}, "penalty"),
]


def every_declaration():
    """A parameter class with every built-in declaration, so each declared check is exercised on its own."""
    from dataclasses import dataclass

    from lora_fusion.methods.icm import FVAE
    from lora_fusion.methods.interference import GAMMA, MAJORITY
    from lora_fusion.methods.lorahub import BUDGET, OPTIMIZER, PENALTY, PER_GROUP
    from lora_fusion.methods.rapf import BIAS, CHAINED
    from lora_fusion.methods.subspace import COMMON_FRACTION
    from lora_fusion.params import DENSITY, ENERGY, RANK, SCALE, SEED, SPACE, SUPPORT, SVD, MethodParams

    @dataclass(frozen=True)
    class Everything(MethodParams):
        rank: int | None = RANK.field()
        energy: float | None = ENERGY.field()
        scale: float = SCALE.field()
        density: float | None = DENSITY.field()
        majority: str = MAJORITY.field()
        gamma: float = GAMMA.field()
        seed: int = SEED.field()
        common_fraction: float = COMMON_FRACTION.field()
        space: str = SPACE.field()
        svd: str = SVD.field()
        bias: float = BIAS.field()
        chained: bool = CHAINED.field()
        fvae: str | None = FVAE.field()
        support: str | None = SUPPORT.field()
        budget: int = BUDGET.field()
        optimizer: str = OPTIMIZER.field()
        per_group: bool = PER_GROUP.field()
        penalty: float = PENALTY.field()

    return Everything


@pytest.mark.parametrize("given", ACCEPTED, ids=str)
def test_merge_parameters_in_their_domain_are_accepted(given) -> None:
    params = every_declaration()(**given)
    assert all(getattr(params, name) == value for name, value in given.items())


def test_path_parameters_accept_path_objects_and_store_text() -> None:
    assert every_declaration()(support=Path("s"), fvae=Path("dir/f")).recorded()["fvae"] == str(Path("dir/f"))


@pytest.mark.parametrize(("given", "name"), REFUSED, ids=str)
def test_merge_parameters_outside_their_domain_are_refused_by_name(given, name) -> None:
    with pytest.raises(InvalidParameterError) as caught:
        every_declaration()(**given)
    assert caught.value.name == name


def test_hub_failures_during_a_push_name_the_repo(hub, tmp_path: Path, monkeypatch) -> None:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import OfflineModeIsEnabled

    from lora_fusion.errors import HubError, HubOfflineError
    from lora_fusion.hub import push_folder

    folder = small_lora(tmp_path / "a")
    hub.fail_next(403, 1, "/api/repos/create")
    with pytest.raises(HubError, match=r"^me/denied: the token lacks permission \(403\)"):
        push_folder(folder, "me/denied")

    def offline(self, *args, **kwargs):  # offline mode switched on after the first check
        raise OfflineModeIsEnabled("offline")

    monkeypatch.setattr(HfApi, "create_repo", offline)
    with pytest.raises(HubOfflineError, match="nothing was pushed to me/late-offline"):
        push_folder(folder, "me/late-offline")


# --------------------------------------------------------------------------------------------- dense SVDs


def decaying(m: int = 150, n: int = 120, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(m, n, generator=g)).Q
    V = torch.linalg.qr(torch.randn(n, n, generator=g)).Q
    return (U * (0.9 ** torch.arange(n, dtype=torch.float32))) @ V.mT


def test_auto_svd_is_exact_up_to_the_limit_and_randomized_past_it(monkeypatch) -> None:
    import lora_fusion.linalg as linalg

    monkeypatch.setattr(linalg, "EXACT_SVD_LIMIT", 120)
    dense, generator = decaying(), torch.Generator().manual_seed(0)
    exact = linalg.exact_svd(dense)
    assert torch.equal(linalg.dense_svd(dense, components=4, generator=generator).S, exact.S)  # min(m, n) = 120
    monkeypatch.setattr(linalg, "EXACT_SVD_LIMIT", 119)
    sketched = linalg.dense_svd(dense, components=4, generator=generator)
    assert sketched.S.numel() == 4 + linalg.OVERSAMPLING


@pytest.mark.parametrize(
    ("svd", "limit", "components", "energy", "widths", "exact"),
    [
        ("randomized", 1024, 4, 0.9, [36], False),  # reached within the first half of a 4·4 + 20 sketch
        ("randomized", 1024, 4, 0.9999, [36, 72, 120], False),  # doubled up to the whole width, which is exact
        ("randomized", 1024, 4, None, [24], False),  # a rank: components + oversampling
        ("auto", 100, 1, 0.9999, [24, 30], True),  # auto caps the sketch at a quarter of 120, then the exact SVD
        ("auto", 100, 4, 0.9999, [36], True),  # a first sketch past the cap: no doubling
        ("auto", 100, 4, 0.9, [36], False),
    ],
)
def test_the_sketch_starts_at_four_times_the_rank_and_doubles_to_its_cap(
    svd, limit, components, energy, widths, exact, monkeypatch
) -> None:
    import lora_fusion.linalg as linalg

    monkeypatch.setattr(linalg, "EXACT_SVD_LIMIT", limit)
    calls = {"widths": [], "exact": 0}
    randomized, exact_svd = linalg.randomized_svd, linalg.exact_svd

    def spy_randomized(dense, *, width, **kwargs):
        calls["widths"].append(width)
        return randomized(dense, width=width, **kwargs)

    def spy_exact(dense):
        calls["exact"] += 1
        return exact_svd(dense)

    monkeypatch.setattr(linalg, "randomized_svd", spy_randomized)
    monkeypatch.setattr(linalg, "exact_svd", spy_exact)
    dense = decaying()
    found = linalg.dense_svd(dense, components=components, generator=torch.Generator().manual_seed(0),
                             rule=linalg.RankRule(energy=energy), svd=svd)
    assert calls == {"widths": widths, "exact": int(exact)}
    if energy is not None:
        expected = linalg.energy_rank(linalg.exact_svd(dense).S, energy)
        assert linalg.energy_rank(found.S, energy, found.total_energy) == expected


def test_energy_rank_edge_cases() -> None:
    from lora_fusion.linalg import energy_rank

    assert energy_rank(torch.tensor([]), 0.9) == 1 and energy_rank(torch.zeros(3), 0.9) == 1
    assert energy_rank(torch.tensor([1.0, 1.0]), 0.5) == 1  # exactly half the energy counts as reached
    assert energy_rank(torch.tensor([3.0, 4.0]), 0.9) == 2 and energy_rank(torch.tensor([0.6, 0.8]), 0.99) == 2
    assert energy_rank(torch.tensor([3.0, 1.0]), 0.99, total=100.0) is None  # the tail holds the rest


def test_randomized_full_space_merges_reach_the_energy_target() -> None:
    from lora_fusion.methods import get_method

    group = two_adapter_group()
    for name in ("ties", "magnitude_prune"):
        spec = get_method(name)
        result = spec.fn(group, spec.resolve({"energy": 0.999, "svd": "randomized"}))
        assert result.stats.retained_energy >= 0.999 and result.stats.rank > group.max_rank


def test_the_randomized_sketch_is_seeded_by_the_seed_and_the_module() -> None:
    from dataclasses import replace

    from lora_fusion.methods import get_method

    spec = get_method("magnitude_prune")  # no random mask: the sketch is the only draw
    group = two_adapter_group()

    def product(seed: int, name: str) -> torch.Tensor:
        result = spec.fn(replace(group, name=name), spec.resolve({"svd": "randomized", "seed": seed, "rank": 2}))
        return result.B @ result.A

    assert torch.equal(product(0, "m"), product(0, "m"))
    assert not torch.equal(product(0, "m"), product(1, "m"))
    assert not torch.equal(product(0, "m"), product(0, "n"))


def test_random_draws_are_seeded_reproducibly_across_releases() -> None:
    from lora_fusion.methods.interference import seeded

    # sha256 of "seed:part:…", first 8 bytes little-endian, top bit cleared: DARE masks and sketches stay the same
    assert seeded(0, "m", 0).initial_seed() == 8158055730424453110
    assert seeded(7, "model.layers.0.self_attn.q_proj", "svd").initial_seed() == 5655395812147706405


def test_a_base_aware_rapf_step_keeps_the_fused_updates_dtype() -> None:
    from lora_fusion.methods.rapf import fuse_update_dense

    g = torch.Generator().manual_seed(6)
    base, fused, delta = (torch.randn(6, 5, generator=g) for _ in range(3))
    assert fuse_update_dense(base, fused, delta, bias=0.5).dtype == torch.float32


def test_rank_and_retained_energy_of_a_partial_or_zero_spectrum() -> None:
    from lora_fusion.linalg import RankRule, choose_rank, retained_energy

    S = torch.tensor([3.0, 4.0])
    assert retained_energy(S, 1) == pytest.approx(9 / 25) and retained_energy(S, 2) == 1.0
    assert retained_energy(torch.tensor([0.6, 0.8]), 1) == pytest.approx(0.36)
    assert retained_energy(torch.zeros(2), 1) == 1.0  # an all-zero update loses nothing
    assert retained_energy(S, 2, total=24.0) == 1.0  # a total rounded below Σσ² still gives at most 1
    assert retained_energy(S, 1, total=100.0) == pytest.approx(0.09)
    # energy not reached by the computed values: all of them
    assert choose_rank(torch.tensor([3.0, 1.0]), RankRule(rank=None, energy=0.99), default=1, total=100.0) == 2
    assert choose_rank(torch.tensor([3.0, 1.0]), RankRule(rank=None, energy=0.5), default=1) == 1
    assert choose_rank(torch.tensor([3.0, 1.0]), RankRule(rank=5, energy=None), default=1) == 2
    assert choose_rank(torch.tensor([3.0, 1.0]), RankRule(rank=None, energy=None), default=1) == 1


def test_the_magnitude_bound_of_a_group() -> None:
    from lora_fusion.adapter import ModuleFactors
    from lora_fusion.methods.base import ModuleGroup

    A, B = torch.full((1, 4), 0.5), torch.full((3, 1), 2.0)  # ‖A‖ = 1, ‖B‖ = 2√3
    group = ModuleGroup("m", [ModuleFactors(A=A, B=B, scale=2.0), ModuleFactors(A=A, B=-B, scale=4.0)], [0.5, -0.25])
    expected = (0.5 * 2.0 + 0.25 * 4.0) * 2 * math.sqrt(3)
    assert group.magnitude() == pytest.approx(expected)
    assert group.magnitude(-3.0) == pytest.approx(3 * expected)


# --------------------------------------------------------------------------------------------- model cards and headers


def card_metadata(card: str) -> dict:
    import yaml

    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def adapter_with(tmp_path: Path, *, base_model: str | None = "org/base", provenance: dict | None = None) -> LoraAdapter:
    source = load_adapter(write_lora(tmp_path / "src", SHAPES, r=4, alpha=8, base_model=base_model))
    tensors = {key: source._store.read(key) for spec in source.modules.values() for key in (spec.a_key, spec.b_key)}
    return LoraAdapter(config=source.config, modules=source.modules, store=MemoryStore(tensors), provenance=provenance)


def test_the_card_metadata_names_the_hub_base_model_and_the_tags(tmp_path: Path) -> None:
    from lora_fusion.writer import model_card

    meta = card_metadata(model_card(adapter_with(tmp_path, base_model="org/base@main", provenance={"method": "ties"})))
    assert meta["base_model"] == "org/base@main" and meta["library_name"] == "peft"
    assert meta["tags"] == ["lora", "peft", "lora-fusion", "merge", "ties"]


def test_a_card_without_a_recorded_method_or_sources_is_a_copy(tmp_path: Path) -> None:
    from lora_fusion.writer import model_card

    card = model_card(adapter_with(tmp_path, provenance={"params": {"scale": 1.0}}))
    assert card_metadata(card)["tags"][-1] == "copy" and "Method: `copy`" in card
    assert "| source | revision |" in card


def test_a_local_base_model_path_never_reaches_the_card_metadata(tmp_path: Path, monkeypatch) -> None:
    from lora_fusion.writer import model_card

    (tmp_path / "org" / "base").mkdir(parents=True)  # `org/base` is also a folder here: a local path, not a Hub id
    monkeypatch.chdir(tmp_path)
    for name in ("org/base", str(tmp_path / "org" / "base")):
        assert "base_model" not in card_metadata(model_card(adapter_with(tmp_path / name.replace("/", "_"), base_model=name)))


@pytest.mark.parametrize("name", [f"source-{'é' * i}" for i in range(8)])  # header lengths of every remainder mod 8
def test_the_safetensors_header_is_written_in_canonical_form(tmp_path: Path, name: str) -> None:
    import json as json_module

    provenance = {"method": "linear", "sources": [{"source": name, "weight": 1.0}]}
    out = adapter_with(tmp_path, provenance=provenance).save_pretrained(tmp_path / "out")
    raw = (out / "adapter_model.safetensors").read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = raw[8 : 8 + size]
    canonical = json_module.dumps(json_module.loads(header), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert header == canonical.encode().ljust(size, b" ")
    assert name in json_module.loads(json_module.loads(header)["__metadata__"]["lora_fusion"])["sources"][0]["source"]


# --------------------------------------------------------------------------------------------- low-rank results


def test_a_merge_that_is_zero_is_written_at_rank_one_with_its_bias(tmp_path: Path) -> None:
    from lora_fusion.adapter import ModuleFactors
    from lora_fusion.methods import ModuleStats, get_method
    from lora_fusion.methods.base import ModuleGroup

    f = ModuleFactors(A=torch.ones(2, 5), B=torch.zeros(4, 2), scale=2.0, bias=torch.arange(4.0))
    spec = get_method("svd")
    result = spec.fn(ModuleGroup("m", [f], [0.5]), spec.resolve({"rank": 2}))
    assert result.stats == ModuleStats(rank=1, retained_energy=1.0, relative_error=0.0, sigma_max=0.0, sigma_next=0.0)
    assert result.A.shape == (1, 5) and result.B.shape == (4, 1)
    assert result.A.dtype == result.B.dtype == torch.float32 and not result.A.any() and not result.B.any()
    torch.testing.assert_close(result.bias, torch.arange(4.0))  # 0.5 · 2 · bias


def test_module_stats_record_the_largest_and_the_first_dropped_singular_value() -> None:
    from lora_fusion.adapter import ModuleFactors
    from lora_fusion.methods import get_method
    from lora_fusion.methods.base import ModuleGroup

    A = torch.eye(3, 6)
    B = torch.zeros(5, 3)
    B[0, 0], B[1, 1], B[2, 2] = 3.0, 2.0, 1.0
    group = ModuleGroup("m", [ModuleFactors(A=A, B=B, scale=1.0)], [1.0])
    spec = get_method("svd")
    cut = spec.fn(group, spec.resolve({"rank": 2})).stats
    assert (cut.rank, cut.sigma_max, cut.sigma_next) == (2, pytest.approx(3.0), pytest.approx(1.0))
    whole = spec.fn(group, spec.resolve({"rank": 3})).stats
    assert (whole.sigma_max, whole.sigma_next) == (pytest.approx(3.0), 0.0)


def test_a_write_that_lost_a_module_is_caught_before_it_replaces_anything(tmp_path: Path, monkeypatch) -> None:
    import lora_fusion.formats.peft as peft

    adapter = load_adapter(small_lora(tmp_path / "a"))
    output_tensors = peft._output_tensors

    def lose_q_proj(adapter):  # a writer bug: one module's factors never reach the file
        return {key: value for key, value in output_tensors(adapter).items() if "q_proj" not in key}

    monkeypatch.setattr(peft, "_output_tensors", lose_q_proj)
    with pytest.raises(CorruptAdapterError, match=f"internal error: module {Q} was not written as planned"):
        adapter.save_pretrained(tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_the_provenance_record_never_holds_a_local_path(tmp_path: Path) -> None:
    import json as json_module

    from safetensors import safe_open

    from lora_fusion.methods import ModuleStats

    provenance = {
        "method": "linear",
        "sources": [{"source": "/home/me/secret/ad1", "subfolder": "/home/me/sub", "weight": 0.5}, {"source": "org/x"}],
        "base_model": "C:\\Users\\me\\llama",
        "params": {"fvae": "../up/fvae", "support": "/data/support.jsonl", "seed": 3, "space": "full"},
    }
    adapter = adapter_with(tmp_path, provenance=provenance)
    adapter.stats = {Q: ModuleStats(rank=2, retained_energy=0.123456789123, relative_error=0.987654321987)}
    out = adapter.save_pretrained(tmp_path / "out")
    with safe_open(str(out / "adapter_model.safetensors"), framework="pt") as file:
        record = json_module.loads(file.metadata()["lora_fusion"])
    assert record["sources"] == [{"source": "ad1", "subfolder": "sub", "weight": 0.5}, {"source": "org/x"}]
    assert record["base_model"] == "llama"
    assert record["params"] == {"fvae": "fvae", "support": "support.jsonl", "seed": 3, "space": "full"}
    assert record["modules"] == {Q: {"rank": 2, "retained_energy": 0.12345679, "relative_error": 0.98765432}}


def test_a_copied_adapter_records_its_source_and_method_copy(tmp_path: Path) -> None:
    import json as json_module

    from safetensors import safe_open

    out = load_adapter(small_lora(tmp_path / "run-3")).save_pretrained(tmp_path / "out")
    with safe_open(str(out / "adapter_model.safetensors"), framework="pt") as file:
        record = json_module.loads(file.metadata()["lora_fusion"])
    assert record["method"] == "copy" and record["modules"] == {}
    assert [entry["source"] for entry in record["sources"]] == ["run-3"]
    config_text = (out / "adapter_config.json").read_text()
    assert config_text == json_module.dumps(json_module.loads(config_text), indent=2, sort_keys=True) + "\n"


def test_a_windows_path_keeps_only_its_last_component() -> None:
    from lora_fusion.writer import _public_name

    assert _public_name("C:\\Users\\me\\base") == "base" and _public_name("C:\\") == "C:\\"
    assert _public_name("org/base") == "org/base" and _public_name("../x/base") == "base"


def test_factors_are_written_in_the_output_dtype(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    source = load_adapter(small_lora(tmp_path / "a"))
    modules, tensors = {}, {}
    for name, spec in source.modules.items():
        out_spec = spec.written(rank=spec.rank, dtype=torch.float16, bias=True)
        factors = source.factors(name)
        modules[name] = out_spec
        tensors.update({out_spec.a_key: factors.A.float(), out_spec.b_key: factors.B.float(),
                        out_spec.bias_key: torch.ones(spec.out_features)})
    config = AdapterConfig(base_model=None, task_type=None, r=4, lora_alpha=4)
    adapter = LoraAdapter(config=config, modules=modules, store=MemoryStore(tensors))
    written = load_file(adapter.save_pretrained(tmp_path / "out") / "adapter_model.safetensors")
    assert {tensor.dtype for tensor in written.values()} == {torch.float16}
    assert len(written) == 3 * len(modules)


def test_the_written_config_is_plain_lora_with_the_most_common_rank_and_alpha(tmp_path: Path) -> None:
    import json as json_module

    from lora_fusion import merge

    shapes = {**SHAPES, "model.layers.1.mlp.up_proj": (16, 12)}
    folder = write_lora(tmp_path / "a", shapes, r=4, alpha=8, rank_pattern={"model.layers.1.mlp.up_proj": 8})
    up = re.escape("model.layers.1.mlp.up_proj")
    common = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": "toy/base", "revision": None,
        "target_modules": sorted(shapes), "use_rslora": False, "use_dora": False, "lora_bias": False,
        "fan_in_fan_out": False, "lora_dropout": 0.0, "bias": "none", "init_lora_weights": True,
        "inference_mode": True, "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
    }
    # A loaded adapter written again keeps its scales in the config: alpha 8 at rank 4 (s = 2) for most modules, and
    # alpha 8 at rank 8 (s = 1) for up_proj, which the common lora_alpha already gives.
    out = load_adapter(folder).save_pretrained(tmp_path / "out")
    config = json_module.loads((out / "adapter_config.json").read_text())
    assert config == {**common, "r": 4, "lora_alpha": 8, "rank_pattern": {up: 8}, "alpha_pattern": {}}
    # A merge has scale 1 in every module: alpha = rank.
    merged = merge([folder], method="linear").save_pretrained(tmp_path / "merged")
    config = json_module.loads((merged / "adapter_config.json").read_text())
    assert config == {**common, "r": 4, "lora_alpha": 4, "rank_pattern": {up: 8}, "alpha_pattern": {up: 8}}


def test_write_adapter_refuses_an_existing_folder_and_creates_missing_parents(tmp_path: Path, monkeypatch) -> None:
    import os

    import lora_fusion.writer as writer
    from lora_fusion.errors import OutputExistsError

    adapter = load_adapter(small_lora(tmp_path / "a"))
    (tmp_path / "taken").mkdir()
    with pytest.raises(OutputExistsError):
        writer.write_adapter(adapter, tmp_path / "taken")
    stages = []
    fill = writer._fill
    monkeypatch.setattr(writer, "_fill", lambda adapter, folder, known: stages.append(folder.name) or fill(adapter, folder, known))
    assert writer.write_adapter(adapter, tmp_path / "new" / "deeper" / "out") == tmp_path / "new" / "deeper" / "out"
    # the stage's name is the one a later write recognises to clean up after a killed writer
    assert re.fullmatch(rf"\.out\.[0-9a-f]{{8}}-{os.getpid()}-{writer._HOST}\.incomplete", stages[0])


def test_non_finite_values_are_refused_in_every_factor_naming_where(tmp_path: Path) -> None:
    from lora_fusion.spec import all_finite
    from lora_fusion.errors import NonFiniteError

    assert all_finite(torch.empty(0)) and all_finite(torch.ones(3)) and not all_finite(torch.tensor([1.0, math.inf]))
    source = load_adapter(small_lora(tmp_path / "a"))
    spec = source.modules[Q]
    with_bias = spec.written(rank=spec.rank, dtype=torch.float32, bias=True)
    factors = source.factors(Q)
    tensors = {with_bias.a_key: factors.A, with_bias.b_key: factors.B,
               with_bias.bias_key: torch.tensor([math.nan] + [0.0] * (spec.out_features - 1))}
    merged = LoraAdapter(config=source.config, modules={Q: with_bias}, store=MemoryStore(tensors))
    with pytest.raises(NonFiniteError, match=f"^merged adapter: module {Q} holds NaN or Inf"):
        merged.factors(Q)  # a NaN in the lora_B bias alone


def test_the_spec_of_a_written_module() -> None:
    from lora_fusion.spec import ModuleSpec

    spec = ModuleSpec(name="m.conv", kind="conv", out_features=6, in_features=12, rank=2, scale=0.5,
                      dtype=torch.float16, a_shape=(2, 3, 2, 2), b_shape=(6, 2, 1, 1), a_key="x.A", b_key="x.B")
    written = spec.written(rank=5, dtype=torch.bfloat16)
    assert written == ModuleSpec(
        name="m.conv", kind="conv", out_features=6, in_features=12, rank=5, scale=1.0, dtype=torch.bfloat16,
        a_shape=(5, 3, 2, 2), b_shape=(6, 5, 1, 1), a_key="m.conv.A", b_key="m.conv.B", bias_key=None,
    )
    assert spec.written(rank=5, dtype=torch.float32, bias=True).bias_key == "m.conv.bias"


def test_peft_state_dict_keys_of_each_module_kind() -> None:
    from lora_fusion.formats.peft import state_dict_keys
    from lora_fusion.spec import ModuleSpec

    def spec(kind: str, bias_key: str | None = None) -> ModuleSpec:
        return ModuleSpec("m.x", kind, 6, 4, 2, 1.0, torch.float32, (2, 4), (6, 2), "a", "b", bias_key)

    prefix = "base_model.model.m.x"
    assert state_dict_keys(spec("conv")) == (f"{prefix}.lora_A.weight", f"{prefix}.lora_B.weight", None)
    assert state_dict_keys(spec("linear", "b.bias"))[2] == f"{prefix}.lora_B.bias"
    assert state_dict_keys(spec("embedding")) == (f"{prefix}.lora_embedding_A", f"{prefix}.lora_embedding_B", None)


def test_a_copy_names_its_tensors_with_peft_keys_whatever_the_source_file_called_them(tmp_path: Path) -> None:
    # keys without PEFT's `base_model.model.` prefix are read; the written adapter uses the keys PEFT loads
    tensors = {"m.q.lora_A.weight": torch.ones(4, 6), "m.q.lora_B.weight": torch.ones(5, 4)}
    out = load_adapter(raw_adapter(tmp_path / "a", tensors)).save_pretrained(tmp_path / "out")
    assert sorted(load_file(out / "adapter_model.safetensors")) == [
        "base_model.model.m.q.lora_A.weight", "base_model.model.m.q.lora_B.weight"
    ]


# ============================================================================================== reading adapters


def raw_adapter(folder: Path, tensors: dict[str, torch.Tensor], **config: object) -> Path:
    """An adapter folder from raw tensors and config fields (r 4, lora_alpha 8 unless given)."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file({key: value.contiguous() for key, value in tensors.items()}, str(folder / "adapter_model.safetensors"))
    fields = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, **config}
    (folder / "adapter_config.json").write_text(json.dumps({k: v for k, v in fields.items() if v is not None}))
    return folder


def pair(name: str, a_shape: tuple[int, ...], b_shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
    prefix = f"base_model.model.{name}"
    return {f"{prefix}.lora_A.weight": torch.ones(a_shape), f"{prefix}.lora_B.weight": torch.ones(b_shape)}


def refused_with(error: type[Exception], folder: Path, *fragments: str) -> str:
    with pytest.raises(error) as caught:
        load_adapter(folder)
    message = str(caught.value)
    assert message.startswith(f"{folder}: "), message  # names the source first
    for fragment in fragments:
        assert fragment in message, message
    return message


REFUSED_FEATURES = {
    "target_parameters": "target_parameters (LoRA on nn.Parameter)",
    "modules_to_save": "modules_to_save (full copies of modules, e.g. heads, are not low-rank updates; keep them "
    "outside the merge)",
    "trainable_token_indices": "trainable_token_indices",
    "layer_replication": "layer_replication",
    "kasa_config": "KaSA",
    "use_qalora": "QA-LoRA",
    "use_bdlora": "BD-LoRA",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "arrow_config": "Arrow routing",
    "monteclora_config": "MonteCLoRA",
    "megatron_config": "Megatron-parallel LoRA",
}


@pytest.mark.parametrize(("key", "feature"), REFUSED_FEATURES.items())
def test_each_lora_variant_is_refused_naming_it(tmp_path: Path, key: str, feature: str) -> None:
    from lora_fusion.errors import UnsupportedAdapterError

    folder = raw_adapter(tmp_path / "a", pair("m.q", (4, 6), (5, 4)), **{key: [1] if key.endswith("s") else True})
    refused_with(UnsupportedAdapterError, folder, f": uses {feature}, which lora-fusion cannot merge exactly;")


def test_dora_mismatches_and_stray_tensors_in_the_weights_are_named(tmp_path: Path) -> None:
    from lora_fusion.errors import CorruptAdapterError, UnsupportedAdapterError

    dora = pair("m.q", (4, 6), (5, 4)) | {"base_model.model.m.q.lora_magnitude_vector": torch.ones(5)}
    refused_with(CorruptAdapterError, raw_adapter(tmp_path / "dora", dora),
                 "module m.q has a lora_magnitude_vector but adapter_config.json does not set use_dora")
    refused_with(CorruptAdapterError, raw_adapter(tmp_path / "no-mu", pair("m.q", (4, 6), (5, 4)), use_dora=True),
                 "use_dora is set but module m.q has no lora_magnitude_vector")
    wrong = pair("m.q", (4, 6), (5, 4)) | {"base_model.model.m.q.lora_magnitude_vector": torch.ones(4)}
    refused_with(CorruptAdapterError, raw_adapter(tmp_path / "wrong", wrong, use_dora=True),
                 "module m.q has a lora_magnitude_vector of shape [4]; expected one value per output row (5)")
    stray = pair("m.q", (4, 6), (5, 4)) | {"base_model.model.m.q.scaling": torch.ones(1)}
    refused_with(UnsupportedAdapterError, raw_adapter(tmp_path / "stray", stray),
                 "scaling' is a tensor that is not a LoRA factor;")


def test_a_folder_with_no_files_at_all_is_not_found(tmp_path: Path) -> None:
    from lora_fusion.errors import SourceNotFoundError

    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceNotFoundError, match="has no adapter_model.safetensors or adapter_model.bin"):
        load_adapter(tmp_path / "empty")


def test_a_config_without_lora_alpha_takes_peft_default_of_8(tmp_path: Path) -> None:
    adapter = load_adapter(raw_adapter(tmp_path / "a", pair("m.q", (4, 6), (5, 4)), lora_alpha=None))
    assert adapter.config.lora_alpha == 8 and adapter.modules["m.q"].scale == 2.0


@pytest.mark.parametrize("value", ["4", True, 0, -1, math.inf], ids=repr)
def test_rank_pattern_values_must_be_positive_numbers(tmp_path: Path, value) -> None:
    folder = raw_adapter(tmp_path / "a", pair("m.q", (4, 6), (5, 4)), rank_pattern={"q": value})
    refused_with(CorruptAdapterError, folder, "rank_pattern['q']=", "; expected a positive number.")


@pytest.mark.parametrize(
    ("a_shape", "b_shape"),
    [
        ((4, 6), (5, 3)),  # B's rank is not A's
        ((4, 6), (5, 4, 1)),  # one is a convolution, the other not
        ((4, 3, 2, 1), (5, 4, 2, 1)),  # a kernel on B: a grouped convolution
        ((4, 3, 1, 1), (5, 4, 1, 2)),
        ((4,), (5, 4)),  # a vector for A
        ((0, 6), (5, 0)),  # rank 0
    ],
    ids=str,
)
def test_factor_shapes_that_are_no_lora_pair_are_refused(tmp_path: Path, a_shape, b_shape) -> None:
    folder = raw_adapter(tmp_path / "a", pair("m.q", a_shape, b_shape))
    refused_with(CorruptAdapterError, folder, "module m.q has lora_A", "which do not form a LoRA pair")


def test_a_module_with_only_one_factor_is_refused(tmp_path: Path) -> None:
    tensors = {"base_model.model.m.q.lora_A.weight": torch.ones(4, 6)}
    refused_with(CorruptAdapterError, raw_adapter(tmp_path / "a", tensors), "module m.q lacks lora_A or lora_B")
    scalar = {"base_model.model.m.q.lora_A.weight": torch.tensor(1.0), "base_model.model.m.q.lora_B.weight": torch.ones(5, 4)}
    refused_with(CorruptAdapterError, raw_adapter(tmp_path / "b", scalar), "which do not form a LoRA pair")


def test_a_conv1d_lora_is_a_convolution(tmp_path: Path) -> None:
    adapter = load_adapter(raw_adapter(tmp_path / "a", pair("m.conv", (4, 3, 5), (6, 4, 1))))
    spec = adapter.modules["m.conv"]
    assert (spec.kind, spec.shape, spec.kernel) == ("conv", (6, 15), (5,))


def test_target_and_exclude_modules_refusals_name_the_source_and_the_setting(tmp_path: Path) -> None:
    tensors = pair("m.k", (4, 6), (5, 4)) | pair("m.q", (4, 6), (5, 4))
    refused_with(CorruptAdapterError, raw_adapter(tmp_path / "t", tensors, target_modules=["k"]),
                 "module m.q has LoRA tensors but target_modules=['k'] does not select it")
    # without target_modules, exclude_modules is still checked for every module, not only the first
    refused_with(CorruptAdapterError, raw_adapter(tmp_path / "e", tensors, exclude_modules=["q"]),
                 "module m.q has LoRA tensors but exclude_modules=['q'] excludes it")
    for key in ("target_modules", "exclude_modules"):
        refused_with(CorruptAdapterError, raw_adapter(tmp_path / key, tensors, **{key: ["q", 3]}),
                     f"adapter_config.json has {key}=['q', 3]; expected a regex string or a list of names.")


def test_spec_refusals_name_the_source(tmp_path: Path) -> None:
    folder = raw_adapter(tmp_path / "rank", pair("m.q", (4, 6), (5, 4)), r=8)
    refused_with(CorruptAdapterError, folder, "module m.q has rank 4 in the weights but 8 in adapter_config.json")
    folder = raw_adapter(tmp_path / "scale", pair("m.q", (4, 6), (5, 4)), lora_alpha=1e300)
    refused_with(CorruptAdapterError, folder, "module m.q has LoRA scale 2.5e+299", "beyond the largest float32")


def test_a_scale_beyond_the_output_dtype_names_that_dtype() -> None:
    from lora_fusion.formats.peft import check_scale_fits

    check_scale_fits("m", 65504.0, torch.float16, "src")  # the largest float16 itself fits
    with pytest.raises(CorruptAdapterError) as caught:
        check_scale_fits("m", 1e6, torch.float16, "src")
    assert "beyond the largest float16 (6.55e+04); fix lora_alpha in adapter_config.json, or write the merge in " \
           "float32 (--dtype float32)." in str(caught.value)


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"r": "4"}, "has r='4'; expected a number >= 1."),
        ({"lora_alpha": -1}, "has lora_alpha=-1; expected a number >= 0."),
        ({"alpha_pattern": {"q": 0}}, "alpha_pattern['q']=0; expected a positive number."),
        ({"base_model_name_or_path": "org/x\n# injected"}, "has base_model_name_or_path='org/x\\n# injected'; expected a name"),
        ({"task_type": 3}, "has task_type=3; expected a name on one line."),
        ({"use_rslora": "false"}, "has use_rslora='false'; expected true or false."),
        ({"fan_in_fan_out": 1}, "has fan_in_fan_out=1; expected true or false."),
    ],
    ids=lambda value: next(iter(value)) if isinstance(value, dict) else "",
)
def test_config_refusals_name_the_source(tmp_path: Path, fields, fragment) -> None:
    from lora_fusion.errors import LoraFusionError

    refused_with(LoraFusionError, raw_adapter(tmp_path / "a", pair("m.q", (4, 6), (5, 4)), **fields), fragment)


def test_a_weights_file_beside_a_full_models_config_is_not_an_adapter(tmp_path: Path) -> None:
    from lora_fusion.errors import NotALoraAdapterError, SourceNotFoundError

    folder = raw_adapter(tmp_path / "model", pair("m.q", (4, 6), (5, 4)))
    (folder / "adapter_config.json").rename(folder / "config.json")
    with pytest.raises(NotALoraAdapterError, match="has config.json but no adapter_config.json"):
        load_adapter(folder / "adapter_model.safetensors")
    (folder / "config.json").unlink()
    with pytest.raises(SourceNotFoundError, match="adapter_config.json not found"):
        load_adapter(folder / "adapter_model.safetensors")


def test_the_collector_is_paused_inside_nested_and_threaded_blocks_and_restored_after_the_last(tmp_path: Path) -> None:
    import gc
    import threading

    from lora_fusion.runtime import collection_paused

    assert gc.isenabled()
    inside, release = threading.Event(), threading.Event()

    def other() -> None:
        with collection_paused():
            inside.set()
            release.wait(5)

    with collection_paused():
        assert not gc.isenabled()
        thread = threading.Thread(target=other)
        thread.start()
        inside.wait(5)
        with collection_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()  # the inner block ended, the outer one has not
    assert not gc.isenabled()  # the other thread's block still runs
    release.set()
    thread.join()
    assert gc.isenabled()
    gc.disable()
    try:
        with collection_paused():
            pass
        assert not gc.isenabled()  # a collector the caller had turned off stays off
    finally:
        gc.enable()
    seen = []
    import lora_fusion

    convert_source = small_lora(tmp_path / "a")
    lora_fusion.convert(convert_source, to="peft", out=tmp_path / "warm")  # the modules a convert imports
    thresholds = gc.get_threshold()
    gc.set_threshold(1)  # a collection at every allocation of a container, were the collector on
    gc.callbacks.append(lambda phase, info: seen.append(phase))
    try:
        lora_fusion.convert(convert_source, to="peft", out=tmp_path / "out")
        during_convert = seen.count("start")  # only as the call enters its block and after it leaves
        seen.clear()
        lora_fusion.load_adapter(convert_source)  # outside a pause: far more, for a fraction of the work
        assert during_convert <= 10 < 100 < seen.count("start"), (during_convert, seen.count("start"))
    finally:
        gc.callbacks.pop()
        gc.set_threshold(*thresholds)
