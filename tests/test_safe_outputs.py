"""Issue 12, items 2 and 5: `--overwrite` never deletes what lora-fusion did not write, and model cards and metadata
neither break on odd source names nor carry local paths.

Sources are tiny adapters written in code (tests/test_reliability.py's `lora`); docs/reliability.md tables each case.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lora_fusion import load_adapter, merge
from lora_fusion.adapter import LoraAdapter
from lora_fusion.errors import LoraFusionError, OutputExistsError, OutputProtectedError
from lora_fusion.spec import MemoryStore
from lora_fusion.writer import check_output_folder, write_adapter
from tests.test_cli import assert_user_error
from tests.test_reliability import SHAPES, hidden_leftovers, invoke, lora, snapshot

ADAPTER = ["README.md", "adapter_config.json", "adapter_model.safetensors"]


def refused(call, *fragments: str) -> OutputProtectedError:
    """Run `call`, expect OutputProtectedError on one line holding every fragment; return it."""
    with pytest.raises(OutputProtectedError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message and isinstance(caught.value, (LoraFusionError, OutputExistsError))
    for fragment in fragments:
        assert fragment in message, message
    return caught.value


def in_memory(source: Path, **changes) -> LoraAdapter:
    """A copy of the adapter at `source` held in memory, as a merge result is (no source of its own)."""
    loaded = load_adapter(source)
    tensors = {key: loaded._store.read(key) for spec in loaded.modules.values() for key in (spec.a_key, spec.b_key)}
    return LoraAdapter(config=loaded.config, modules=loaded.modules, store=MemoryStore(tensors), **changes)


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """A project folder, also the current directory: two source adapters, a notes file and a data folder."""
    work = tmp_path / "project"
    lora(work / "ad1", seed=1)
    lora(work / "ad2", seed=2)
    (work / "notes.txt").write_text("mine\n")
    (work / "data").mkdir()
    (work / "data" / "train.jsonl").write_text("{}\n")
    monkeypatch.chdir(work)
    return work


# --------------------------------------------------------------------------------------------- item 2: what is refused


def test_cli_merge_into_the_current_directory_with_overwrite_is_refused_and_deletes_nothing(workdir) -> None:
    before = snapshot(workdir)
    result = invoke("merge", "ad1", "ad2", "--out", ".", "--overwrite")
    line = assert_user_error(result, f"refusing to replace {workdir}", "it is the current directory")
    assert "ad1/, ad2/, data/ and 1 more" in line  # up to three of the files at stake
    assert snapshot(workdir) == before and hidden_leftovers(workdir.parent) == []


@pytest.mark.parametrize(
    ("out", "reason"),
    [(".", "it is the current directory"), ("..", "it contains the current directory"), ("/", "it is the root folder")],
)
def test_save_pretrained_refuses_the_current_directory_its_parents_and_root(workdir, out, reason) -> None:
    before = snapshot(workdir)
    refused(lambda: in_memory(workdir / "ad1").save_pretrained(out, overwrite=True), "refusing to replace", reason)
    assert snapshot(workdir) == before


def test_the_home_folder_and_its_parents_are_refused(tmp_path, monkeypatch) -> None:
    home = tmp_path / "users" / "me"
    lora(home, seed=1)  # adapter files only: nothing but being home protects it
    monkeypatch.setenv("HOME", str(home))
    refused(lambda: check_output_folder(home, overwrite=True), f"refusing to replace {home}", "it is the home folder")
    refused(lambda: check_output_folder("~", overwrite=True), "it is the home folder")
    refused(lambda: check_output_folder(home.parent, overwrite=True), "it contains the home folder")


def test_a_source_is_never_replaced_by_its_own_copy(tmp_path) -> None:
    source = lora(tmp_path / "copy" / "ad1", seed=1)
    before = snapshot(source)
    adapter = load_adapter(source)
    refused(lambda: adapter.save_pretrained(source, overwrite=True), f"it is the input {source}")
    assert snapshot(source) == before


@pytest.mark.parametrize("where", ["is", "contains", "inside"])
def test_folders_that_are_hold_or_lie_inside_an_input_are_refused(tmp_path, where) -> None:
    ad1 = lora(tmp_path / "copy" / "ad1", seed=1)
    nested = lora(ad1 / "old-merge", seed=3)  # adapter files only, inside the source
    out = {"is": ad1, "contains": tmp_path / "copy", "inside": nested}[where]
    before = snapshot(tmp_path)
    merged = in_memory(ad1, inputs=[ad1, "org/hub-source@main"])  # as merge() sets it (see the report)
    reason = {"is": "it is the input", "contains": "it contains the input", "inside": "it lies inside the input"}
    refused(lambda: merged.save_pretrained(out, overwrite=True), reason[where], str(ad1))
    refused(lambda: write_adapter(in_memory(ad1), out, overwrite=True, protected=[ad1]), reason[where])
    assert snapshot(tmp_path) == before


def test_merge_api_refuses_to_replace_one_of_its_sources(tmp_path) -> None:
    ad1, ad2 = lora(tmp_path / "copy" / "ad1", seed=1), lora(tmp_path / "ad2", seed=2)
    before = snapshot(tmp_path)
    refused(lambda: merge([ad1, ad2]).save_pretrained(ad1, overwrite=True), "it is the input")
    assert snapshot(tmp_path) == before


def test_the_cli_pre_check_protects_sources_given_as_raw_arguments(tmp_path, monkeypatch) -> None:
    # What cli/main.py's _run_merge is to call before merging: the raw source strings and --base-model, Hub ids too.
    ad1 = lora(tmp_path / "copy" / "ad1", seed=1)
    monkeypatch.chdir(tmp_path)
    refused(lambda: check_output_folder(Path("copy/ad1"), overwrite=True, protected=["copy/ad1", "org/b@v2"]),
            "it is the input copy/ad1")
    check_output_folder(Path("elsewhere"), overwrite=True, protected=["copy/ad1"])  # new folders are always fine
    with pytest.raises(OutputExistsError, match="already exists; pass --overwrite"):
        check_output_folder(ad1, overwrite=False, protected=[])


def test_a_local_base_model_is_protected_through_the_merge_provenance(tmp_path) -> None:
    base = tmp_path / "models" / "tiny-base"
    base.mkdir(parents=True)
    save_file({f"{name}.weight": torch.randn(m, n) for name, (m, n) in SHAPES.items()}, str(base / "model.safetensors"))
    (base / "config.json").write_text("{}")
    kept = lora(base / "adapters" / "first", seed=4)  # an adapter folder inside the base model
    merged = merge([lora(tmp_path / "a", seed=1)], method="rapf", base_model=base)
    assert merged.provenance["base_model"] == str(base)
    before = snapshot(tmp_path / "models")
    refused(lambda: merged.save_pretrained(kept, overwrite=True), "lies inside the input", str(base))
    refused(lambda: merged.save_pretrained(tmp_path / "models", overwrite=True), "contains the input")
    assert snapshot(tmp_path / "models") == before
    metadata = _metadata(merged.save_pretrained(tmp_path / "out"))
    assert metadata["base_model"] == "tiny-base" and str(tmp_path) not in json.dumps(metadata)  # item 5


def test_a_folder_with_other_files_is_refused_naming_three_of_them(tmp_path) -> None:
    out = merge([lora(tmp_path / "a")]).save_pretrained(tmp_path / "out")
    for name in ("notes.txt", "eval.json", "zz.log"):
        (out / name).write_text(name)
    (out / "checkpoints").mkdir()
    before = snapshot(out)
    error = refused(
        lambda: merge([lora(tmp_path / "b", seed=2)]).save_pretrained(out, overwrite=True),
        f"refusing to replace {out}: it holds files lora-fusion did not write",
        "replacing it would delete checkpoints/, eval.json, notes.txt and 1 more",
        "move those files out of it first",
    )
    assert error.files == ["checkpoints/", "eval.json", "notes.txt", "zz.log"] and error.folder == out
    assert snapshot(out) == before and hidden_leftovers(tmp_path) == []


def test_cli_merge_over_a_folder_with_other_files_is_one_line_and_keeps_everything(tmp_path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = invoke("merge", lora(tmp_path / "a"), "--out", out, "--overwrite")
    assert_user_error(result, str(out), "notes.txt", "lora-fusion did not write")
    assert snapshot(out) == {"notes.txt": b"mine"} and hidden_leftovers(tmp_path) == []


@pytest.mark.parametrize("kind", ["file", "link", "readme-only"])
def test_files_links_and_a_lone_readme_are_refused(tmp_path, kind) -> None:
    out = tmp_path / "out"
    target = lora(tmp_path / "real")
    if kind == "file":
        out.write_text("a file")
    elif kind == "link":
        out.symlink_to(target, target_is_directory=True)
    else:
        out.mkdir()
        (out / "README.md").write_text("# My project\n")
    reason = {"file": "it is a file", "link": "it is a symbolic link", "readme-only": "README.md"}[kind]
    before = snapshot(tmp_path)
    refused(lambda: merge([target]).save_pretrained(out, overwrite=True), reason)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("kind", ["our-output", "peft-folder", "empty", "our-card-only", "legacy-bin"])
def test_folders_of_adapter_files_only_are_replaced(tmp_path, kind) -> None:
    out = tmp_path / "out"
    if kind == "our-output":
        merge([lora(tmp_path / "old", seed=5)]).save_pretrained(out)
    elif kind == "peft-folder":
        lora(out, seed=5)
        (out / "README.md").write_text("---\nlibrary_name: peft\n---\n# Model Card for Model ID\n")  # PEFT's card
    elif kind == "our-card-only":
        card = (merge([lora(tmp_path / "old", seed=5)]).save_pretrained(tmp_path / "tmp") / "README.md").read_text()
        out.mkdir()
        (out / "README.md").write_text(card)
    elif kind == "legacy-bin":
        out.mkdir()
        (out / "adapter_config.json").write_text("{}")
        (out / "adapter_model.bin").write_bytes(b"\0")
    else:
        out.mkdir()
    written = merge([lora(tmp_path / "a", seed=1)]).save_pretrained(out, overwrite=True)
    assert sorted(p.name for p in written.iterdir()) == ADAPTER
    assert load_adapter(out).modules.keys() == SHAPES.keys() and hidden_leftovers(tmp_path) == []


def test_files_put_into_the_output_during_the_write_stop_the_replacement(tmp_path, monkeypatch) -> None:
    import lora_fusion.writer as writer

    out = merge([lora(tmp_path / "old")]).save_pretrained(tmp_path / "out")
    check_written = writer._check_written

    def meanwhile(adapter, folder, out, known):  # the first check passed; a user saves a file into the output
        check_written(adapter, folder, out, known)
        (out / "notes.txt").write_text("saved during the merge")

    monkeypatch.setattr(writer, "_check_written", meanwhile)
    refused(lambda: merge([lora(tmp_path / "a", seed=1)]).save_pretrained(out, overwrite=True), "notes.txt")
    assert sorted(p.name for p in out.iterdir()) == sorted([*ADAPTER, "notes.txt"])
    assert hidden_leftovers(tmp_path) == []


# --------------------------------------------------------------------------------------------- item 5: cards, metadata


def _metadata(folder: Path) -> dict:
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        return json.loads(f.metadata()["lora_fusion"])


def _sources_table(card: str) -> list[list[str]]:
    """The rows of the card's Sources table as a CommonMark + GFM-tables renderer reads them (cell text)."""
    from markdown_it import MarkdownIt

    tokens = MarkdownIt("commonmark").enable("table").parse(card.split("## Sources", 1)[1].split("## Parameters")[0])
    rows, row = [], None
    for token in tokens:
        if token.type == "tr_open":
            row = []
        elif token.type == "inline" and row is not None:
            children = token.children or []
            row.append("".join(child.content for child in children if child.type in ("text", "code_inline")))
        elif token.type == "tr_close":
            rows.append(row)
            row = None
    return rows[1:]  # without the header


def _sha256(folder: Path) -> str:
    return hashlib.sha256(
        (folder / "adapter_config.json").read_bytes() + (folder / "adapter_model.safetensors").read_bytes()
    ).hexdigest()


def test_markdown_and_line_breaks_in_source_names_cannot_break_the_card(tmp_path) -> None:
    from huggingface_hub import ModelCard

    odd = lora(tmp_path / "a|b`c", seed=1)
    broken = lora(tmp_path / "line\nbreak <b>[x](y)", seed=2)
    out = merge([odd, broken], weights=[0.5, 0.5]).save_pretrained(tmp_path / "out")
    card = (out / "README.md").read_text()
    rows = _sources_table(card)
    assert [len(row) for row in rows] == [5, 5]  # the names opened no extra cell
    assert rows[0][0] == "a|b`c" and rows[0][3] == _sha256(odd) and rows[0][4] == "0.5"
    assert rows[1][0] == "line\\nbreak <b>[x](y)"  # the line break is shown, not obeyed; no tag, no link
    assert "<b>" not in card and "line\nbreak" not in card
    assert ModelCard.load(out / "README.md").data.library_name == "peft"  # the YAML header still parses


def test_no_absolute_path_goes_into_the_card_or_the_metadata(tmp_path, monkeypatch) -> None:
    base_dir = tmp_path / "models" / "llama-local"
    base_dir.mkdir(parents=True)
    first = lora(tmp_path / "adapters" / "math", seed=1)
    second = lora(tmp_path / "adapters" / "code", seed=2)
    rewrite = json.loads((second / "adapter_config.json").read_text())
    (second / "adapter_config.json").write_text(json.dumps({**rewrite, "base_model_name_or_path": str(base_dir)}))
    monkeypatch.chdir(tmp_path / "adapters")
    out = merge([first, "code"], ignore_base_model=True, method="svd", rank=4).save_pretrained(tmp_path / "out")
    card, metadata = (out / "README.md").read_text(), _metadata(out)
    for text in (card, json.dumps(metadata)):
        assert str(tmp_path) not in text and "/adapters/" not in text
    local = {"revision": None, "subfolder": None, "commit": None, "weight": 1.0}
    assert metadata["sources"] == [
        {"source": "math", **local, "sha256": _sha256(first)},
        {"source": "code", **local, "sha256": _sha256(second)},
    ]
    assert [row[0] for row in _sources_table(card)] == ["math", "code"]


def test_a_local_base_model_path_stays_out_of_the_card(tmp_path) -> None:
    from huggingface_hub import ModelCard

    base = tmp_path / "models" / "llama-local"
    source = lora(tmp_path / "a", seed=1)
    config = json.loads((source / "adapter_config.json").read_text())
    (source / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(base)}))
    out = load_adapter(source).save_pretrained(tmp_path / "out")
    card = (out / "README.md").read_text()
    assert str(tmp_path) not in card and "# base: llama-local" in card
    assert ModelCard.load(out / "README.md").data.base_model is None  # a path is no Hub id for the metadata
    # adapter_config.json keeps PEFT's own field as the source had it (see the report)
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base)


def test_hub_sources_keep_repo_revision_subfolder_and_commit(hub, tmp_path) -> None:
    commit = hub.add_repo("org/hubby", {f"sub/{k}": v for k, v in snapshot(lora(tmp_path / "h", seed=3)).items()})
    local = lora(tmp_path / "local-one", seed=4)
    merged = merge([load_adapter("org/hubby@main", subfolder="sub"), local])
    out = merged.save_pretrained(tmp_path / "out")
    assert _metadata(out)["sources"] == [
        {"source": "org/hubby", "revision": "main", "subfolder": "sub", "commit": commit, "weight": 1.0},
        {"source": "local-one", "revision": None, "subfolder": None, "commit": None, "sha256": _sha256(local),
         "weight": 1.0},
    ]
    assert _sources_table((out / "README.md").read_text())[0] == ["org/hubby", "main", "sub", commit, "1.0"]
