"""Fast tests that kill mutants which survived `make mutation` in lora_fusion/writer.py, lora_fusion/formats/ (peft.py,
stores.py), spec.py, sources.py and adapter.py (docs/testing.md; the survivor table with the reason for each one kept
is recorded there).

Each test checks behaviour a caller sees (a written file, a model card's text, an error and its message), with
expected values written out by hand. What another process or the system would do (remove or create a file between
two system calls, refuse a signal, a read or a deletion) is reproduced in-process by wrapping one writer step or one
`os`/`pathlib` call for the test's duration (the tests run as root, where permissions refuse nothing); nothing here
starts a process, sleeps or uses the network.
"""

from __future__ import annotations

import errno
import json
import os
import pathlib
import shutil
from pathlib import Path

import pytest
import torch

from lora_fusion import load_adapter
from lora_fusion import writer
from lora_fusion.adapter import LoraAdapter
from lora_fusion.errors import NonFiniteError, OutputProtectedError
from lora_fusion.formats.stores import save_safetensors
from lora_fusion.methods.base import ModuleStats
from lora_fusion.spec import AdapterConfig, MemoryStore
from tests.test_properties import write_lora

SHAPES = {"model.layers.0.self_attn.q_proj": (16, 12), "model.layers.0.self_attn.v_proj": (16, 12)}
Q = "model.layers.0.self_attn.q_proj"


def small_lora(folder: Path, seed: int = 0) -> Path:
    return write_lora(folder, SHAPES, r=4, alpha=8, seed=seed)


def empty_adapter(base_model: str | None = None, **kwargs: object) -> LoraAdapter:
    config = AdapterConfig(base_model=base_model, task_type=None, r=1, lora_alpha=1)
    return LoraAdapter(config=config, modules={}, store=MemoryStore({}), **kwargs)


def card_section(card: str, heading: str) -> list[str]:
    """The lines of `card` from `heading` to the end of the section's first table or code block."""
    lines = card.split("\n")
    start = lines.index(heading)
    end = next(i for i in range(start + 1, len(lines)) if lines[i].startswith(("|", "```")))
    while end < len(lines) and lines[end]:
        end += 1
    return lines[start:end]


def dead_stage(out: Path, pid: int) -> Path:
    """A staging folder of `out` as a writer with `pid` on this host leaves it when killed."""
    stage = out.with_name(f".{out.name}.0123abcd-{pid}-{writer._HOST}.incomplete")
    stage.mkdir(parents=True)
    (stage / "adapter_model.safetensors").write_bytes(b"partial")
    return stage


# ============================================================================================== write_adapter


def test_the_check_just_before_the_rename_still_protects_the_inputs(tmp_path: Path, monkeypatch) -> None:
    adapter = load_adapter(small_lora(tmp_path / "a"))
    out = adapter.save_pretrained(tmp_path / "out")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    arriving = out / "adapter_model.bin"  # an input of this write that appears in `out` while the write runs
    fill = writer._fill

    def fill_while_the_input_arrives(adapter, folder, known):
        fill(adapter, folder, known)
        arriving.write_bytes(b"the user's input")

    monkeypatch.setattr(writer, "_fill", fill_while_the_input_arrives)
    with pytest.raises(OutputProtectedError, match="it contains the input"):
        writer.write_adapter(adapter, out, overwrite=True, protected=[arriving])
    assert arriving.read_bytes() == b"the user's input"
    assert {p.name: p.read_bytes() for p in out.iterdir() if p != arriving} == before


def test_a_write_that_overflows_the_output_dtype_is_refused_naming_the_output(tmp_path: Path) -> None:
    from lora_fusion.spec import ModuleSpec

    spec = ModuleSpec(name=Q, kind="linear", out_features=3, in_features=2, rank=1, scale=1.0, dtype=torch.float16,
                      a_shape=(1, 2), b_shape=(3, 1), a_key="A", b_key="B")
    store = MemoryStore({"A": torch.full((1, 2), 1e6), "B": torch.ones(3, 1)})  # finite in float32, inf in float16
    adapter = LoraAdapter(config=AdapterConfig(base_model=None, task_type=None, r=1, lora_alpha=1),
                          modules={Q: spec}, store=store)
    with pytest.raises(NonFiniteError, match=rf"merged-out: module {Q} does not fit in float16 .* float32"):
        writer.write_adapter(adapter, tmp_path / "merged-out")
    assert not (tmp_path / "merged-out").exists()


# ============================================================================================== check_output_folder


def test_an_unreadable_readme_alone_counts_as_the_users_file(tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("---\n---\n\n# LoRA adapter merged with lora-fusion\n")
    writer.check_output_folder(out, overwrite=True)  # readable: a lora-fusion card, may be replaced
    real_open = pathlib.Path.open

    def refuse_readme(self, *args, **kwargs):  # the tests run as root, where chmod 000 does not stop a read
        if self.name == "README.md":
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "open", refuse_readme)
    with pytest.raises(OutputProtectedError, match="it holds files lora-fusion did not write") as caught:
        writer.check_output_folder(out, overwrite=True)
    assert "README.md" in str(caught.value)


# ============================================================================================== dead stages


def test_a_dead_stage_removed_by_another_writer_meanwhile_does_not_fail_the_write(tmp_path: Path, monkeypatch) -> None:
    adapter = load_adapter(small_lora(tmp_path / "a"))
    out = tmp_path / "out"
    stage = dead_stage(out, 999_999)
    seen = []

    def dead_and_removed_by_someone_else(pid: int) -> bool:
        seen.append(pid)
        shutil.rmtree(stage)  # a concurrent writer cleans the same leftover first
        return False

    monkeypatch.setattr(writer, "_alive", dead_and_removed_by_someone_else)
    assert writer.write_adapter(adapter, out) == out
    assert seen == [999_999]
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]


def test_a_stage_of_another_users_live_process_is_kept(tmp_path: Path, monkeypatch) -> None:
    adapter = load_adapter(small_lora(tmp_path / "a"))
    out = tmp_path / "out"
    other_users, dead = dead_stage(out, 999_998), dead_stage(out, 999_997)
    real_kill = os.kill

    def kill(pid: int, signal: int) -> None:
        if pid == 999_998:  # exists, but belongs to another user: signalling it is refused
            raise PermissionError(errno.EPERM, "Operation not permitted")
        if pid == 999_997:
            raise ProcessLookupError(errno.ESRCH, "No such process")
        real_kill(pid, signal)

    monkeypatch.setattr(os, "kill", kill)
    writer.write_adapter(adapter, out)
    assert other_users.is_dir() and not dead.exists()


# ============================================================================================== model card


def test_the_card_names_a_hub_base_model_in_its_metadata(tmp_path: Path) -> None:
    card = writer.model_card(load_adapter(small_lora(tmp_path / "a")))  # base_model_name_or_path: toy/base
    header = card.split("\n---\n")[0]
    assert "\nbase_model: toy/base\n" in header + "\n"
    assert "# base: toy/base" in card


def test_the_sources_table_leaves_missing_cells_empty() -> None:
    source = {"source": "org/math-lora", "revision": None, "subfolder": None, "commit": "abc123", "weight": 0.5}
    card = writer.model_card(empty_adapter(provenance={"method": "linear", "sources": [source]}))
    assert card_section(card, "## Sources")[-3:] == [
        "| source | revision | subfolder | resolved commit or sha256 | weight |",
        "|---|---|---|---|---|",
        "| `org/math-lora` |  |  | `abc123` | `0.5` |",
    ]


def test_the_parameters_table_lists_each_parameter_with_names_escaped_only_when_needed() -> None:
    params = {"density": 0.5, "svd_rank": 8, "a|b": "x"}
    card = writer.model_card(empty_adapter(provenance={"method": "ties", "params": params}))
    assert card_section(card, "## Parameters") == [
        "## Parameters",
        "",
        "| parameter | value |",
        "|---|---|",
        "| density | `0.5` |",
        "| svd_rank | `8` |",
        "| a\\|b | `x` |",
    ]


def test_the_parameters_table_says_none_when_there_are_no_parameters() -> None:
    card = writer.model_card(empty_adapter(provenance={"method": "linear", "params": {}}))
    assert card_section(card, "## Parameters")[2:] == ["| parameter | value |", "|---|---|", "| (none) | |"]


def test_the_truncated_modules_table_is_a_markdown_table() -> None:
    stats = {Q: ModuleStats(rank=2, retained_energy=0.75, relative_error=0.5)}
    card = writer.model_card(empty_adapter(stats=stats))
    assert card_section(card, "## Truncated modules")[-3:] == [
        "| module | rank | retained energy | relative error |",
        "|---|---|---|---|",
        f"| `{Q}` | 2 | 0.750000 | 5.00e-01 |",
    ]


def test_the_use_block_is_a_python_code_block_naming_no_base_model_as_none() -> None:
    card = writer.model_card(empty_adapter())
    assert card_section(card, "## Use") == [
        "## Use",
        "",
        "```python",
        "from peft import PeftModel",
        'model = PeftModel.from_pretrained(base_model, "<this repo or folder>")  # base: None',
        "```",
    ]


def test_the_use_block_shows_a_control_character_of_the_base_model_as_a_question_mark() -> None:
    card = writer.model_card(empty_adapter(base_model="org/base\nimport os"))
    assert "  # base: org/base?import os\n```\n" in card


# ============================================================================================== _swap_into_place


def test_an_old_output_that_cannot_be_deleted_does_not_fail_the_completed_overwrite(tmp_path, monkeypatch) -> None:
    first = load_adapter(small_lora(tmp_path / "a", seed=1))
    second = load_adapter(small_lora(tmp_path / "b", seed=2))
    out = first.save_pretrained(tmp_path / "out")
    real_rmdir = os.rmdir

    def rmdir(path, *args, **kwargs):  # the previous output, once renamed aside, cannot be removed (busy, ...)
        if str(path).endswith(".old"):
            raise OSError(errno.EBUSY, "Device or resource busy", str(path))
        return real_rmdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "rmdir", rmdir)
    assert writer.write_adapter(second, out, overwrite=True) == out
    expected = second.factors(Q)
    written = load_adapter(out).factors(Q)
    assert torch.allclose(written.delta(), expected.delta(), atol=1e-6)


# ============================================================================================== stores


def test_save_safetensors_reraises_an_io_error_with_its_errno(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as caught:  # errno 2 maps to FileNotFoundError
        save_safetensors({"x": torch.ones(2)}, tmp_path / "missing" / "x.safetensors", metadata={})
    assert caught.value.errno == errno.ENOENT
    assert caught.value.strerror == os.strerror(errno.ENOENT)


def test_save_safetensors_aligns_each_tensor_and_computes_pending_ones_when_writing(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from lora_fusion.formats.stores import PendingTensor

    computed = []
    half = torch.arange(3, dtype=torch.float16)  # 6 bytes: a float32 after it would be misaligned
    pending = PendingTensor((2, 2), torch.float32, lambda: computed.append(1) or torch.full((2, 2), 3.0))
    tensors = {"a_half": half, "b_alpha": torch.tensor(4.0), "c_pending": pending, "d_double": torch.ones(1).double()}
    path = tmp_path / "x.safetensors"
    save_safetensors(tensors, path, metadata={"k": "v"})
    assert computed == [1]
    size = int.from_bytes(path.read_bytes()[:8], "little")
    assert size % 8 == 0
    header = json.loads(path.read_bytes()[8 : 8 + size])
    for key, tensor in (("a_half", half), ("b_alpha", torch.tensor(4.0)), ("d_double", torch.ones(1).double())):
        assert header[key]["data_offsets"][0] % tensor.element_size() == 0, key
    assert header["c_pending"]["data_offsets"][0] % 4 == 0
    loaded = load_file(path)
    assert torch.equal(loaded["a_half"], half) and torch.equal(loaded["c_pending"], torch.full((2, 2), 3.0))
    assert loaded["b_alpha"].item() == 4.0 and loaded["d_double"].dtype == torch.float64
    again = tmp_path / "y.safetensors"
    save_safetensors(tensors, again, metadata={"k": "v"})
    assert again.read_bytes() == path.read_bytes()  # same inputs, same bytes


def test_tensors_of_every_layout_are_written_as_their_values(tmp_path: Path) -> None:
    """Contiguous tensors of any rank go to the file as they lie in memory; a transposed view, a slice, contiguous
    ones with another stride on a dimension of size 1 (the last: a rank-1 factor; the first; a middle one), a 0-dim
    tensor, one that requires grad and an N-d bfloat16 one are written as their values too."""
    from safetensors.torch import load_file

    grid = torch.arange(12.0).reshape(3, 4)
    column, row = torch.arange(4.0).as_strided((4, 1), (1, 32)), torch.arange(4.0).as_strided((1, 4), (99, 1))
    middle = torch.arange(8.0).as_strided((2, 1, 4), (4, 99, 1))
    assert column.is_contiguous() and column.stride(-1) != 1 and row.is_contiguous() and middle.is_contiguous()
    tensors = {"transposed": grid.t(), "sliced": grid[:, :2], "column": column, "row": row, "middle": middle,
               "scalar": torch.tensor(5.0),
               "grad": torch.ones(2, 3, requires_grad=True), "bf16": torch.arange(24.0).reshape(2, 3, 4).bfloat16(),
               "int64": torch.arange(4, dtype=torch.int64)}
    save_safetensors(tensors, tmp_path / "x.safetensors", metadata={})
    loaded = load_file(tmp_path / "x.safetensors")
    for key, tensor in tensors.items():
        assert loaded[key].shape == tensor.shape and torch.equal(loaded[key], tensor.detach()), key


def test_late_metadata_is_asked_for_after_the_data_and_written_over_its_provisional_header(tmp_path: Path) -> None:
    from safetensors import safe_open

    from lora_fusion.formats.stores import LateMetadata, PendingTensor, with_items

    events = []
    last = PendingTensor((5,), torch.float16, lambda: events.append("data") or torch.ones(5, dtype=torch.float16))
    tensors = {"b": torch.arange(6.0).reshape(2, 3), "z": last}  # "z" is written last
    direct = tmp_path / "direct.safetensors"
    save_safetensors(tensors, direct, metadata={"k": "f" * 64, "x": "y"})

    def final(value: str):
        return lambda: events.append("final") or {"k": value}

    for name, value in (("same", "f" * 64), ("shorter", "none"), ("longer", "f" * 200)):
        events.clear()
        path = tmp_path / f"{name}.safetensors"
        save_safetensors(tensors, path, metadata=with_items(LateMetadata({"k": "0" * 64}, final(value)), {"x": "y"}))
        with safe_open(str(path), framework="pt") as file:
            assert file.metadata() == {"format": "pt", "k": value, "x": "y"}
            assert torch.equal(file.get_tensor("b"), tensors["b"]) and torch.equal(file.get_tensor("z"), torch.ones(5).half())
        # the final values are asked for once, after the data; the longer one made the file be written again
        assert events == (["data", "final", "data"] if name == "longer" else ["data", "final"])
    # a final header as long as the provisional one: the bytes of writing it directly
    assert (tmp_path / "same.safetensors").read_bytes() == direct.read_bytes()
    raw = (tmp_path / "shorter.safetensors").read_bytes()
    size = int.from_bytes(raw[:8], "little")
    assert raw[8:8 + size].endswith(b" " * 60) and size % 8 == 0  # padded to the provisional length


def test_a_header_with_non_ascii_metadata_is_still_sorted(tmp_path: Path) -> None:
    metadata = {f"key{i}": "café ü " * 8 for i in (7, 3, 9, 0, 5, 1, 8, 2, 6, 4)}
    path = tmp_path / "x.safetensors"
    save_safetensors({"b": torch.ones(2), "a": torch.zeros(3)}, path, metadata=metadata)
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = raw[8 : 8 + size]
    parsed = json.loads(header)
    assert list(parsed["__metadata__"]) == ["format"] + [f"key{i}" for i in range(10)]
    assert list(parsed) == ["__metadata__", "a", "b"]
    assert "café ü".encode() in header  # kept as UTF-8, not \\u-escaped


def test_the_header_is_json_dumps_with_sorted_keys_wherever_the_metadata_key_sorts(tmp_path: Path) -> None:
    """The entries are serialised once and the metadata member put where "__metadata__" sorts: keys before it
    (capitals, digits, "_A") and after it ("_z", lower case), keys JSON must escape, and a scalar's empty shape give
    json.dumps(sort_keys=True)'s bytes."""
    keys = ["b", "A", "0x", "_A", "__a", "_z", "é", "a", 'q"uote', "back\\slash", "tab\t"]
    tensors = {key: torch.full((2,), float(i)) for i, key in enumerate(keys)}
    tensors["scalar"] = torch.tensor(1.0)
    path = tmp_path / "x.safetensors"
    save_safetensors(tensors, path, metadata={"z": "1", "a": "é"})
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    parsed = json.loads(raw[8 : 8 + size])
    expected = json.dumps(parsed, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    assert raw[8 : 8 + size] == expected + b" " * (-len(expected) % 8)
    assert list(parsed) == ["0x", "A", "_A", "__a", "__metadata__", "_z", "a", "b", "back\\slash", 'q"uote', "scalar",
                            "tab\t", "é"]


def test_a_store_reads_an_empty_tensor_and_checks_a_run_up_to_its_own_end(tmp_path: Path) -> None:
    """A float32 run followed by one float16 value: the run's finiteness pass stops at its own last byte (reading
    on would take 2 bytes that make no float32). An empty tensor reads in its shape and dtype."""
    from lora_fusion.formats.stores import SafetensorsStore

    path = tmp_path / "x.safetensors"
    save_safetensors({"a": torch.ones(3), "b": torch.ones(1, dtype=torch.float16),
                      "empty": torch.ones(0, 4, dtype=torch.bfloat16)}, path, metadata={})
    store = SafetensorsStore(path, "x")
    assert store.known_finite("a") and store.known_finite("b")
    empty = store.read("empty")
    assert empty.shape == (0, 4) and empty.dtype == torch.bfloat16


def test_a_folded_scale_reaches_the_bias_and_an_overflow_names_its_module() -> None:
    """A negative scale is folded (no config can record it): s = -4 as A·2 and B·(-2), the bias times -4; a value
    that overflows float16 once folded is refused naming the module, be it in B or in the bias."""
    from lora_fusion.errors import OutputOverflowError
    from lora_fusion.formats.peft import output_factors
    from lora_fusion.formats.stores import materialized
    from lora_fusion.spec import ModuleSpec

    def adapter(b: float, bias: float) -> LoraAdapter:
        spec = ModuleSpec(name="m.proj", kind="linear", out_features=3, in_features=2, rank=1, scale=-4.0,
                          dtype=torch.float16, a_shape=(1, 2), b_shape=(3, 1), a_key="a", b_key="b", bias_key="bias")
        tensors = {"a": torch.ones(1, 2, dtype=torch.float16), "b": torch.full((3, 1), b, dtype=torch.float16),
                   "bias": torch.full((3,), bias, dtype=torch.float16)}
        config = AdapterConfig(base_model=None, task_type=None, r=1, lora_alpha=-4.0)
        return LoraAdapter(config=config, modules={"m.proj": spec}, store=MemoryStore(tensors))

    a, b, bias = (materialized(t) for t in output_factors(adapter(1.0, 1.0), "m.proj", fold_scale=True))
    assert torch.equal(a, torch.full((1, 2), 2.0, dtype=torch.float16))
    assert torch.equal(b, torch.full((3, 1), -2.0, dtype=torch.float16))
    assert torch.equal(bias, torch.full((3,), -4.0, dtype=torch.float16))
    for big_b, big_bias in ((40000.0, 1.0), (1.0, 20000.0)):
        with pytest.raises(OutputOverflowError, match="module m.proj does not fit in float16"):
            for tensor in output_factors(adapter(big_b, big_bias), "m.proj", fold_scale=True):
                materialized(tensor)


def test_a_kohya_file_is_detected_as_kohya(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from lora_fusion.formats import detect_format
    from lora_fusion.formats.kohya import KOHYA

    name = "lora_te_text_model_encoder_layers_0_mlp_fc1"
    save_file({f"{name}.lora_down.weight": torch.ones(2, 8), f"{name}.lora_up.weight": torch.ones(8, 2)},
              tmp_path / "k.safetensors")
    assert detect_format(tmp_path / "k.safetensors") is KOHYA


# ============================================================================================== peft


def test_peft_detects_an_adapter_folder_and_a_weights_file_beside_its_config(tmp_path: Path) -> None:
    from lora_fusion.formats.peft import PEFT

    folder = small_lora(tmp_path / "a")
    (tmp_path / "a" / "sub").mkdir()
    assert PEFT.detect(folder) and PEFT.detect(folder / "adapter_model.safetensors")
    assert not PEFT.detect(folder / "sub")  # the config is in its parent, not in it
    assert not PEFT.detect(tmp_path)


@pytest.mark.parametrize("key", ["target_modules", "exclude_modules"])
def test_an_invalid_module_regex_is_refused_naming_the_source(key: str, tmp_path: Path) -> None:
    from lora_fusion.errors import CorruptAdapterError

    folder = write_lora(tmp_path / "code-lora", SHAPES, r=4, alpha=8, extra={key: "q_proj("})
    with pytest.raises(CorruptAdapterError, match=r"code-lora: adapter_config\.json has the pattern 'q_proj\(',"):
        load_adapter(folder)


# ============================================================================================== adapter


def test_non_finite_factors_of_a_loaded_adapter_are_refused_naming_its_source(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    folder = small_lora(tmp_path / "code-lora")
    tensors = load_file(folder / "adapter_model.safetensors")
    tensors[f"base_model.model.{Q}.lora_B.weight"][0, 0] = float("nan")
    save_file(tensors, folder / "adapter_model.safetensors")
    adapter = load_adapter(folder)
    with pytest.raises(NonFiniteError, match=rf"^\S*code-lora: module {Q} holds NaN or Inf"):
        adapter.factors(Q)


# ---------------------------------------------------------------------------------------------- PeftFormat.read


def test_a_config_given_for_an_adapter_folder_may_lie_outside_it(tmp_path: Path) -> None:
    folder = small_lora(tmp_path / "a")  # r=4, alpha=8: scale 2
    elsewhere = tmp_path / "configs"
    elsewhere.mkdir()
    config = json.loads((folder / "adapter_config.json").read_text())
    (elsewhere / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": 16}))
    adapter = load_adapter(folder, config=elsewhere / "adapter_config.json")
    assert adapter.modules[Q].scale == 4.0  # 16 / 4: the given config, not the folder's


@pytest.mark.parametrize("case", ["link", "bin", "safetensors"])
def test_unreadable_weights_are_refused_naming_the_source(case: str, tmp_path: Path) -> None:
    import re

    from lora_fusion.errors import CorruptAdapterError

    folder = small_lora(tmp_path / "code-lora")
    weights = folder / "adapter_model.safetensors"
    if case == "link":
        outside = tmp_path / "outside.safetensors"
        weights.rename(outside)
        weights.symlink_to(outside)
    elif case == "bin":
        weights.unlink()
        (folder / "adapter_model.bin").write_bytes(b"PK\x03\x04 not a torch file")
    else:
        weights.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    with pytest.raises(CorruptAdapterError, match="^" + re.escape(f"{folder}: adapter_model.")):
        load_adapter(str(folder))
