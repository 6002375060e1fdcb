"""Reliability and security (issue 7): hostile or broken files, faults while writing, a failing Hub, token hygiene
and determinism. docs/reliability.md tables every case with the test that backs it.

Hub faults are injected by the local FakeHub (tests/hub_server.py); huggingface_hub's backoff sleeps are recorded
instead of slept, so the retry schedule is checked without waiting for it.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import resource
import shutil
import signal
import struct
import subprocess
import sys
import time
import types
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from lora_fusion import load_adapter, merge
from lora_fusion.errors import CorruptAdapterError, LoraFusionError, UnsupportedAdapterError
from lora_fusion_cli.main import app
from tests.test_cli import assert_user_error
from tests.test_properties import write_lora

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {f"model.layers.{i}.self_attn.{p}": (32, 24) for i in (0, 1) for p in ("q_proj", "v_proj")}
FAKE_TOKEN = "hf_lorafusionFAKEtoken0123456789abcdef"
OTHER_FAKE_TOKEN = "hf_lorafusionOTHERfake9876543210fedcba"


def invoke(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])




def lora(folder: Path, seed: int = 0, *, shapes: dict | None = None, r: int = 4, alpha: float = 8) -> Path:
    """A PEFT LoRA adapter of four 32×24 modules (or `shapes`), written directly (no PEFT import)."""
    return write_lora(folder, shapes or SHAPES, r=r, alpha=alpha, seed=seed)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def hidden_leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def refuse(source: Path, error: type[Exception], fragment: str) -> str:
    with pytest.raises(error) as caught:
        load_adapter(source)
    message = str(caught.value)
    assert fragment in message, message
    assert "\n" not in message  # the CLI prints it on one line
    return message


# --------------------------------------------------------------------------------------------- untrusted files


def header_file(folder: Path, header: dict | bytes, data: bytes = b"", length: int | None = None) -> Path:
    """A safetensors file from a raw header (8-byte little-endian length, JSON, data), next to a valid config."""
    lora(folder)
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    size = struct.pack("<Q", len(raw) if length is None else length)
    (folder / "adapter_model.safetensors").write_bytes(size + raw + data)
    return folder


A_KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
B_KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
HOSTILE_HEADERS = {
    # shape·dtype overflows 64 bits: refused by safetensors while parsing the header
    "overflowing_shape": ({A_KEY: {"dtype": "F32", "shape": [1 << 40, 1 << 40], "data_offsets": [0, 8]}}, b"\0" * 8, None),
    # 4 TiB of claimed data in a 16-byte file: "file not fully covered", nothing allocated
    "huge_claimed_data": (
        {
            A_KEY: {"dtype": "F32", "shape": [4, 1 << 38], "data_offsets": [0, 1 << 42]},
            B_KEY: {"dtype": "F32", "shape": [32, 4], "data_offsets": [1 << 42, (1 << 42) + 512]},
        },
        b"\0" * 16,
        None,
    ),
    "shape_disagrees_with_offsets": ({A_KEY: {"dtype": "F32", "shape": [4, 24], "data_offsets": [0, 8]}}, b"\0" * 8, None),
    "header_length_2_pow_63": ({}, b"", 1 << 63),
    "header_length_past_the_end": ({}, b"", 50_000_000),
    "header_not_json": (b"{\"a\": [1, 2", b"", None),
    "unknown_dtype": ({A_KEY: {"dtype": "Q8", "shape": [4, 24], "data_offsets": [0, 96]}}, b"\0" * 96, None),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_HEADERS))
def test_hostile_safetensors_headers_are_refused_before_allocating(case, tmp_path) -> None:
    header, data, length = HOSTILE_HEADERS[case]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    refuse(header_file(tmp_path / case, header, data, length), CorruptAdapterError, "not a readable safetensors file")
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 64, f"peak RSS grew by {grown_mb:.0f} MB"


@pytest.mark.parametrize("keep", [0, 7, 8, 40, -1])
def test_truncated_safetensors_is_refused_wherever_it_is_cut(keep, tmp_path) -> None:
    folder = lora(tmp_path / "cut")
    weights = folder / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:keep])  # empty, inside the length field, right after it, inside the header, one byte short
    refuse(folder, CorruptAdapterError, "safetensors")


def rewrite_config(folder: Path, **changes) -> Path:
    config = json.loads((folder / "adapter_config.json").read_text())
    config.update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


BAD_CONFIGS = {
    "r_string": ({"r": "4"}, "r='4'"),
    "r_float": ({"r": 4.0}, "r=4.0"),
    "r_bool": ({"r": True}, "r=True"),
    "r_zero": ({"r": 0}, "r=0"),
    "r_huge": ({"r": 10**12}, "rank 4 in the weights but 1000000000000"),
    "r_beyond_float": ({"r": 10**400}, "rank 4 in the weights"),
    "alpha_negative": ({"lora_alpha": -8}, "lora_alpha=-8"),
    "alpha_string": ({"lora_alpha": "8"}, "lora_alpha='8'"),
    "alpha_infinite": ({"lora_alpha": float("inf")}, "lora_alpha=inf"),
    "alpha_nan": ({"lora_alpha": float("nan")}, "lora_alpha=nan"),
    "rslora_string": ({"use_rslora": "false"}, "use_rslora='false'"),
    "fan_in_fan_out_int": ({"fan_in_fan_out": 1}, "fan_in_fan_out=1"),
    "base_model_number": ({"base_model_name_or_path": 5}, "base_model_name_or_path=5"),
    "base_model_newline": ({"base_model_name_or_path": "org/m\n```\n# injected"}, "expected a name on one line"),
    "task_type_list": ({"task_type": ["CAUSAL_LM"]}, "task_type=['CAUSAL_LM']"),
    "rank_pattern_list": ({"rank_pattern": ["q_proj"]}, "rank_pattern of type list"),
    "rank_pattern_negative": ({"rank_pattern": {"q_proj": -1}}, "rank_pattern['q_proj']=-1"),
    "alpha_pattern_infinite": ({"alpha_pattern": {"q_proj": float("inf")}}, "alpha_pattern['q_proj']=inf"),
    "pattern_bad_regex": ({"rank_pattern": {"q_proj(": 4}}, "not a valid regular expression"),
    "peft_type_missing": ({"peft_type": None}, "no peft_type"),
    "peft_type_list": ({"peft_type": ["LORA"]}, "not LORA"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_adapter_config_with_wrong_types_or_values_is_refused(case, tmp_path) -> None:
    changes, fragment = BAD_CONFIGS[case]
    folder = rewrite_config(lora(tmp_path / case), **changes)
    assert len(refuse(folder, LoraFusionError, fragment)) < len(str(folder)) + 200  # a 400-digit r is shortened


def test_config_file_that_is_not_a_json_object_is_refused(tmp_path) -> None:
    for text, fragment in [("[1, 2]", "must hold a JSON object"), ("{'r': 4}", "not valid JSON"), ("\xff\xfe", "not valid JSON")]:
        folder = lora(tmp_path / f"c{len(text)}")
        (folder / "adapter_config.json").write_bytes(text.encode("latin1"))
        refuse(folder, CorruptAdapterError, fragment)


@pytest.mark.parametrize(
    "module",
    ["model/layers.0.q_proj", "model.layers..q_proj", "..", "/etc/passwd", "model.layers.0.q proj",
     "C:\\evil.q_proj", "model.layers.0.q_proj`|<script>"],
)
def test_tensor_keys_naming_paths_instead_of_modules_are_refused(module, tmp_path) -> None:
    folder = lora(tmp_path / "keys")
    tensors = load_file(folder / "adapter_model.safetensors")
    tensors[f"base_model.model.{module}.lora_A.weight"] = torch.zeros(4, 24)
    tensors[f"base_model.model.{module}.lora_B.weight"] = torch.zeros(32, 4)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    refuse(folder, CorruptAdapterError, "is not a module path")


def test_tensor_key_with_a_newline_is_refused_on_one_line(tmp_path) -> None:
    folder = lora(tmp_path / "newline")
    tensors = load_file(folder / "adapter_model.safetensors")
    tensors["base_model.model.model.layers.0\n# injected.lora_A.weight"] = torch.zeros(4, 24)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    refuse(folder, UnsupportedAdapterError, "not a LoRA factor")


def test_paths_in_target_modules_and_patterns_are_never_used_as_paths(tmp_path) -> None:
    # target_modules that select none of the tensors' modules are refused, as PEFT refuses to load them (issue 12 §3);
    # pattern keys are only regexes: the output names exactly the modules of the weights, in the config and the card.
    refuse(rewrite_config(lora(tmp_path / "targets"), target_modules=["../../../etc/passwd", "/abs/path"]),
           CorruptAdapterError, "does not select it")
    folder = rewrite_config(lora(tmp_path / "paths"), target_modules=None, rank_pattern={"../../etc/shadow": 2})
    out = merge([folder]).save_pretrained(tmp_path / "out")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["target_modules"] == sorted(SHAPES) and config["rank_pattern"] == {}
    assert "etc" not in (out / "README.md").read_text()
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]


class Payload:
    """Unpickling this runs `os.system(...)`: the classic pickle payload."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("zip_format", [True, False], ids=["torch-zip", "legacy-pickle"])
def test_pickled_payload_in_adapter_model_bin_is_never_run(zip_format, tmp_path) -> None:
    # tests/test_adapters.py::test_pickle_payload_is_never_run writes a bare pickle, which torch refuses before
    # unpickling (mmap needs the zip format); these are files torch.save really writes, so weights_only decides.
    marker = tmp_path / "pwned"
    folder = lora(tmp_path / "hostile")
    (folder / "adapter_model.safetensors").unlink()
    state = {**load_file(lora(tmp_path / "src") / "adapter_model.safetensors"), "x": Payload(marker)}
    torch.save(state, folder / "adapter_model.bin", _use_new_zipfile_serialization=zip_format)
    refuse(folder, CorruptAdapterError, "never run")
    assert not marker.exists()


def test_legacy_format_bin_without_payload_loads(tmp_path) -> None:
    # before the fix, every .bin that was not in torch's zip format was refused as "corrupted or carrying code"
    source = lora(tmp_path / "src", seed=3)
    folder = lora(tmp_path / "legacy")
    (folder / "adapter_model.safetensors").unlink()
    torch.save(load_file(source / "adapter_model.safetensors"), folder / "adapter_model.bin", _use_new_zipfile_serialization=False)
    name = next(iter(SHAPES))
    assert torch.equal(load_adapter(folder).delta(name), load_adapter(source).delta(name))


def test_truncated_bin_is_refused(tmp_path) -> None:
    folder = lora(tmp_path / "bin")
    state = load_file(folder / "adapter_model.safetensors")
    (folder / "adapter_model.safetensors").unlink()
    torch.save(state, folder / "adapter_model.bin")
    data = (folder / "adapter_model.bin").read_bytes()
    (folder / "adapter_model.bin").write_bytes(data[: len(data) // 2])
    refuse(folder, CorruptAdapterError, "could not be read as plain tensors")


@pytest.mark.parametrize("linked", ["adapter_model.safetensors", "adapter_config.json"])
def test_symlinks_leaving_the_adapter_directory_are_refused(linked, tmp_path) -> None:
    elsewhere = lora(tmp_path / "elsewhere", seed=5)  # a valid adapter: without the check the link would load
    folder = lora(tmp_path / "shared")
    (folder / linked).unlink()
    (folder / linked).symlink_to(elsewhere / linked)
    message = refuse(folder, CorruptAdapterError, "outside the adapter directory")
    assert str(elsewhere / linked) in message
    result = invoke("merge", folder, "--out", tmp_path / "never")
    assert_user_error(result, "outside the adapter directory")
    assert not (tmp_path / "never").exists()


def test_symlinks_inside_the_directory_and_hub_cache_snapshots_are_followed(hub, tmp_path) -> None:
    folder = lora(tmp_path / "inside")
    (folder / "weights-v2.safetensors").write_bytes((folder / "adapter_model.safetensors").read_bytes())
    (folder / "adapter_model.safetensors").unlink()
    (folder / "adapter_model.safetensors").symlink_to("weights-v2.safetensors")
    assert load_adapter(folder).modules.keys() == SHAPES.keys()
    # the Hub cache's snapshot folders hold links into the repo's blobs/: passing one as a local path works
    hub.add_repo("rel/cached", snapshot(lora(tmp_path / "pushed", seed=6)))
    snapshot_dir = Path(load_adapter("rel/cached").source.path)
    assert (snapshot_dir / "adapter_model.safetensors").is_symlink()
    assert load_adapter(snapshot_dir).modules.keys() == SHAPES.keys()


def test_push_refuses_a_folder_with_a_link_to_a_file_outside_it(hub, tmp_path) -> None:
    secret = tmp_path / "id_rsa"
    secret.write_text("-----BEGIN OPENSSH PRIVATE KEY----- not a real key")
    folder = merge([lora(tmp_path / "a")]).save_pretrained(tmp_path / "download")
    (folder / "README.md").unlink()
    (folder / "README.md").symlink_to(secret)  # huggingface_hub's upload_folder would upload the key's content
    assert_user_error(invoke("push", folder, "me/leak"), "outside the folder", "README.md")
    assert not [path for method, path in hub.requests if method == "POST"]


def test_push_refuses_a_folder_with_a_looping_link(hub, tmp_path) -> None:
    folder = merge([lora(tmp_path / "a")]).save_pretrained(tmp_path / "out")
    (folder / "loop").symlink_to(folder / "loop")
    assert_user_error(invoke("push", folder, "me/loop"), "broken or looping link", "loop")
    assert not [path for method, path in hub.requests if method == "POST"]


def test_trust_remote_code_and_unrestricted_torch_load_are_never_used() -> None:
    sources = sorted((ROOT / "lora_fusion").rglob("*.py")) + sorted((ROOT / "cli").rglob("*.py"))
    assert len(sources) > 10
    for path in sources:
        text = path.read_text()
        assert "trust_remote_code" not in text, path
        for start in (m.end() for m in re.finditer(r"\btorch\.load\(", text)):
            depth, end = 1, start
            while depth:  # the call's arguments, nested parentheses included
                depth += {"(": 1, ")": -1}.get(text[end], 0)
                end += 1
            assert "weights_only=True" in text[start:end], (path, text[start:end])


def test_no_unrestricted_pickle_load() -> None:
    offenders = [
        str(path.relative_to(ROOT))
        for path in sorted((ROOT / "lora_fusion").rglob("*.py"))
        if re.search(r"\bpickle\.loads?\(", path.read_text())
    ]
    assert offenders == []


def test_a_cifar_folder_carrying_a_pickled_payload_is_refused_without_running_it(tmp_path) -> None:

    from lora_fusion.cil.data import cifar100
    from lora_fusion.cil.errors import DatasetNotFoundError

    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for name in ("train", "test", "meta"):
        (folder / name).write_bytes(pickle.dumps({"fine_label_names": ["a"], "data": Payload()}))
    with pytest.raises(DatasetNotFoundError, match="posix.system is not allowed|os.system is not allowed"):
        cifar100(tmp_path)
    assert not marker.exists()


# --------------------------------------------------------------------------------------------- faults while writing

KILL_SCRIPT = """
import sys, time
from pathlib import Path
import lora_fusion.formats.stores as stores
from lora_fusion import merge

source, out, marker = sys.argv[1:4]
write = stores.write_tensor_bytes

def stall(file, tensor):  # the safetensors file is half written in the staging folder; config and card are not yet
    write(file, tensor)
    file.flush()
    Path(marker).write_text(str(Path(file.name).parent))
    time.sleep(300)

stores.write_tensor_bytes = stall
merge([source], weights=[2.0]).save_pretrained(out, overwrite=True)
"""


def test_merge_killed_mid_write_leaves_the_previous_output_and_the_next_write_cleans_up(tmp_path) -> None:
    from lora_fusion.writer import write_adapter

    source = lora(tmp_path / "a")
    out = merge([source]).save_pretrained(tmp_path / "out")
    before = snapshot(out)
    marker = tmp_path / "stage-is"
    child = subprocess.Popen(
        [sys.executable, "-c", KILL_SCRIPT, str(source), str(out), str(marker)], cwd=ROOT, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 120
        while not marker.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), child.stderr.read().decode() if child.poll() is not None else "timed out"
        stage = Path(marker.read_text())
        assert sorted(p.name for p in stage.iterdir()) == ["adapter_model.safetensors"]  # half written
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert snapshot(out) == before  # the earlier output is intact
    assert hidden_leftovers(tmp_path) == [stage.name]  # SIGKILL skips `finally`: the hidden stage stays...
    assert stage.name.startswith(".out.") and f"-{child.pid}-" in stage.name
    (tmp_path / f".out.0123abcd-{child.pid}-zzzzzz.incomplete").mkdir()  # another host's: never touched
    write_adapter(merge([source], weights=[3.0]), out, overwrite=True)
    # ...until the next write to the same output removes it (only if the writer ran on this host)
    assert hidden_leftovers(tmp_path) == [f".out.0123abcd-{child.pid}-zzzzzz.incomplete"]
    assert snapshot(out) != before


@contextmanager
def file_size_limit(nbytes: int) -> Iterator[None]:
    """RLIMIT_FSIZE for this process: a write past `nbytes` fails with EFBIG (Python ignores SIGXFSZ)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def test_a_size_capped_write_is_one_clear_error_and_leaves_nothing(tmp_path) -> None:
    # tests/test_cli.py::test_a_failed_write_leaves_the_previous_output_intact patches the tensor write to raise
    # OSError; here the kernel refuses a real write (EFBIG). (When safetensors' save_file wrote the file, this came as
    # SafetensorError "I/O error: File too large (os error 27)", which escaped as a traceback before a fix.)
    big = {name: (256, 256) for name in SHAPES}
    out = merge([lora(tmp_path / "small")]).save_pretrained(tmp_path / "out")
    before = snapshot(out)
    source = lora(tmp_path / "big", shapes=big, r=16)
    with file_size_limit(32 * 1024):
        result = invoke("merge", source, "--out", out, "--overwrite")
    assert_user_error(result, "File too large", "nothing was written")
    assert snapshot(out) == before
    assert hidden_leftovers(tmp_path) == []


FULL_DISK_CHILD = """
import sys
from pathlib import Path
from tests.test_reliability import merge_onto_a_full_disk
merge_onto_a_full_disk(*map(Path, sys.argv[1:4]), filter_writes=sys.argv[4] == "filter")
"""


def fail_writes_with_enospc() -> None:
    """From now on, every write of this thread (and of threads it starts) to a file descriptor above 2 fails with
    ENOSPC, as on a full disk. A seccomp filter: it needs no privileges, and the error comes from the kernel, so
    safetensors' Rust writer sees exactly what a full disk gives it. Linux on x86-64 or arm64."""
    import ctypes
    import errno
    import platform

    class SockFilter(ctypes.Structure):
        _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint32)]

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter))]

    # AUDIT_ARCH_* and the numbers of write, pwrite64, writev, pwritev, pwritev2
    arch, calls = {"x86_64": (0xC000003E, (1, 18, 20, 296, 328)),
                   "aarch64": (0xC00000B7, (64, 68, 66, 70, 287))}[platform.machine()]
    # BPF_LD|BPF_W|BPF_ABS, BPF_JMP|BPF_JEQ|BPF_K, BPF_JMP|BPF_JGT|BPF_K, BPF_RET|BPF_K
    load, jeq, jgt, ret = 0x20, 0x15, 0x25, 0x06
    allow, enospc = 0x7FFF0000, 0x00050000 | errno.ENOSPC  # SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO | ENOSPC
    n = len(calls)
    program = [
        (load, 0, 0, 4),  # seccomp_data.arch
        (jeq, 0, n + 1, arch),  # another ABI: allow
        (load, 0, 0, 0),  # seccomp_data.nr
        *((jeq, n - i, 0, nr) for i, nr in enumerate(calls)),  # a write call: check its fd
        (ret, 0, 0, allow),
        (load, 0, 0, 16),  # low half of seccomp_data.args[0], the fd (little-endian)
        (jgt, 0, 1, 2),
        (ret, 0, 0, enospc),
        (ret, 0, 0, allow),
    ]
    filters = (SockFilter * len(program))(*(SockFilter(*instruction) for instruction in program))
    libc = ctypes.CDLL(None, use_errno=True)
    # PR_SET_NO_NEW_PRIVS (lets an unprivileged process install a filter), then PR_SET_SECCOMP, SECCOMP_MODE_FILTER
    if libc.prctl(38, 1, 0, 0, 0) or libc.prctl(22, 2, ctypes.byref(SockFprog(len(program), filters)), 0, 0):
        raise OSError(ctypes.get_errno(), "cannot install the seccomp filter")


def merge_onto_a_full_disk(disk: Path, small: Path, big: Path, *, filter_writes: bool) -> None:
    """Write `small`'s merge to `disk`/out (it fits), then overwrite it with `big`'s (it does not): one clear error,
    the previous output intact and no staging folder left. `disk` is a 96 KiB tmpfs, or with `filter_writes` an
    ordinary folder whose writes fail with ENOSPC once the first output is written. Runs in a child process."""
    out = merge([small]).save_pretrained(disk / "out")
    before = snapshot(out)
    if filter_writes:
        fail_writes_with_enospc()
    result = invoke("merge", big, "--out", out, "--overwrite")
    assert_user_error(result, "No space left on device", "nothing was written")
    assert snapshot(out) == before, "the previous output changed"
    assert hidden_leftovers(disk) == [], hidden_leftovers(disk)


def test_a_full_tmpfs_is_one_clear_error_and_leaves_nothing(tmp_path) -> None:
    # A real full disk: a 96 KiB tmpfs, mounted in a user and mount namespace of a child process, so that no root is
    # needed and the mount ends with the child. Where user namespaces are off (some containers, Ubuntu's AppArmor
    # default), the child's writes fail with the kernel's ENOSPC instead (fail_writes_with_enospc); never a skip.
    disk = tmp_path / "disk"
    disk.mkdir()
    small, big = lora(tmp_path / "small"), lora(tmp_path / "big", shapes={name: (256, 256) for name in SHAPES}, r=16)
    namespace = ["unshare", "--user", "--map-root-user", "--mount"]
    mount = ["sh", "-c", 'mount -t tmpfs -o size=96k tmpfs "$0" && exec "$@"', str(disk)]
    probe = shutil.which("unshare") and not subprocess.run([*namespace, *mount, "true"], capture_output=True).returncode
    child = [sys.executable, "-c", FULL_DISK_CHILD, str(disk), str(small), str(big), "tmpfs" if probe else "filter"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    ran = subprocess.run([*namespace, *mount, *child] if probe else child, capture_output=True, text=True, env=env,
                         timeout=300)
    assert ran.returncode == 0, f"full disk by {child[-1]}:\n{ran.stdout}{ran.stderr}"


# --------------------------------------------------------------------------------------------- a failing Hub


@pytest.fixture
def backoff(monkeypatch) -> list[float]:
    """Record huggingface_hub's backoff sleeps instead of sleeping; short timeouts for the slow-server cases."""
    import huggingface_hub.constants
    import huggingface_hub.file_download
    import huggingface_hub.utils._http

    sleeps: list[float] = []
    clock = types.SimpleNamespace(sleep=sleeps.append, time=time.time, monotonic=time.monotonic)
    monkeypatch.setattr(huggingface_hub.utils._http, "time", clock)
    monkeypatch.setattr(huggingface_hub.file_download, "time", clock)
    # 1.5 s: a loaded CI machine must not time out an ordinary answer (the injected delays are 3 s)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_ETAG_TIMEOUT", 1.5)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DOWNLOAD_TIMEOUT", 1.5)
    monkeypatch.setattr(huggingface_hub.file_download, "_ETAG_RETRY_TIMEOUT", 1.5)
    return sleeps


def requests_for(hub, method: str, fragment: str) -> int:
    return sum(1 for m, path in hub.requests if m == method and fragment in path)


@pytest.mark.parametrize(
    ("fault", "heads", "gets", "sleeps"),
    [
        # hf_hub_download: the metadata HEAD fails once without retry, then is retried with backoff 1, 2, 4, 8, 8 s
        (("fail", 500, 2, "HEAD"), 3, 1, [1]),
        (("fail", 503, 3, "HEAD"), 4, 1, [1, 2]),
        # 429 waits Retry-After + 1 s
        (("fail", 429, 3, "HEAD"), 4, 1, [1.0, 1.0]),
        (("delay", 3.0, 2, "HEAD"), 3, 1, [1]),
        # the file GET itself is retried on 408/429 only, by http_stream_backoff; on timeouts it resumes after 1 s
        (("fail", 429, 2, "GET"), 1, 3, [1.0, 1.0]),
        (("delay", 3.0, 1, "GET"), 1, 2, [1]),
    ],
    ids=["500-head", "503-head", "429-head", "timeout-head", "429-get", "timeout-get"],
)
def test_transient_hub_faults_are_retried_like_huggingface_hub(fault, heads, gets, sleeps, hub, backoff, tmp_path) -> None:
    kind, value, count, method = fault
    name = f"rel/transient-{kind}-{value}-{method}".replace(".", "-")
    hub.add_repo(name, snapshot(lora(tmp_path / "a")))
    inject = hub.fail_next if kind == "fail" else hub.delay_next
    inject(value, count, "adapter_config.json", method=method)
    assert load_adapter(name).modules.keys() == SHAPES.keys()
    assert requests_for(hub, "HEAD", "adapter_config.json") == heads
    assert requests_for(hub, "GET", "adapter_config.json") == gets
    assert backoff == sleeps


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        (("fail", 500, "HEAD"), "answered 500 (a server error) after huggingface_hub's retries; try again later"),
        (("fail", 429, "HEAD"), "rate-limiting requests (429 after huggingface_hub's retries)"),
        (("delay", 3.0, "HEAD"), "did not answer in time (ReadTimeout, after huggingface_hub's retries)"),
        (("fail", 500, "GET"), "answered 500 (a server error); try again later"),
    ],
    ids=["500-head", "429-head", "timeout-head", "500-get"],
)
def test_persistent_hub_faults_end_in_one_line_after_the_retries(fault, message, hub, backoff, tmp_path) -> None:
    kind, value, method = fault
    name = f"rel/down-{kind}-{value}-{method}".replace(".", "-")
    hub.add_repo(name, snapshot(lora(tmp_path / "a")))
    (hub.fail_next if kind == "fail" else hub.delay_next)(value, 1000, "adapter_config.json", method=method)
    assert_user_error(invoke("merge", name, "--out", tmp_path / "never"), name, message)
    assert not (tmp_path / "never").exists()
    if method == "HEAD":  # one plain HEAD, then http_backoff's 1 + 5 retries
        assert requests_for(hub, "HEAD", "adapter_config.json") == 7
        assert [round(s) for s in backoff] == ([1, 1, 1, 1, 1] if value == 429 else [1, 2, 4, 8, 8])
    else:  # huggingface_hub does not retry a 500 on the file download itself
        assert requests_for(hub, "GET", "adapter_config.json") == 1 and backoff == []
    hub.clear_faults()  # a delayed request may still be sleeping in the server


def test_a_failed_push_keeps_the_local_result(hub, backoff, tmp_path) -> None:
    source = lora(tmp_path / "a")
    hub.fail_next(500, 1000, "/preupload/")
    out = tmp_path / "merged"
    result = invoke("merge", source, "--out", out, "--push-to-hub", "me/unlucky")
    assert_user_error(result, "me/unlucky", "answered 500")
    assert requests_for(hub, "POST", "/preupload/") == 6 and backoff == [1, 2, 4, 8, 8]  # preupload uses http_backoff
    assert load_adapter(out).modules.keys() == SHAPES.keys()
    assert hidden_leftovers(tmp_path) == []
    hub.clear_faults()
    pushed = invoke("push", out, "me/unlucky")  # the saved folder can be pushed again once the Hub is back
    assert pushed.exit_code == 0, pushed.output
    assert hub.repo_files("me/unlucky")["adapter_model.safetensors"] == (out / "adapter_model.safetensors").read_bytes()


def test_a_failed_push_says_the_local_result_is_kept(hub, backoff, tmp_path) -> None:
    hub.fail_next(500, 1000, "/preupload/")
    out = tmp_path / "merged"
    line = assert_user_error(invoke("merge", lora(tmp_path / "a"), "--out", out, "--push-to-hub", "me/unlucky"))
    assert "answered 500" in line and f"saved in {out}" in line and f"lora-fusion push {out} me/unlucky" in line


# --------------------------------------------------------------------------------------------- tokens


def test_tokens_never_appear_in_outputs_logs_errors_cards_or_metadata(hub, backoff, tmp_path, monkeypatch, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="huggingface_hub")  # the library sets its own logger to WARNING
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    hub.required_token = FAKE_TOKEN
    hub.add_repo("rel/private-a", snapshot(lora(tmp_path / "a", seed=1)), private=True)
    hub.add_repo("rel/private-b", snapshot(lora(tmp_path / "b", seed=2)), private=True)
    texts: list[str] = []
    results = [
        invoke("merge", "rel/private-a", "rel/private-b", "--method", "svd", "--rank", "4", "--out", tmp_path / "o1",
               "--push-to-hub", "me/pushed", "--json"),
        invoke("inspect", "rel/private-a", "--json"),
        invoke("merge", "rel/private-a", "--method", "ties", "--dry-run"),
        invoke("merge", "rel/missing", "--out", tmp_path / "never"),  # an error
        invoke("push", tmp_path / "o1", "me/pushed-again"),
    ]
    hub.fail_next(500, 1000, "/preupload/")
    results.append(invoke("merge", "rel/private-a", "--out", tmp_path / "o2", "--push-to-hub", "me/failing"))
    hub.clear_faults()
    hub.add_repo("rel/private-c", snapshot(lora(tmp_path / "a", seed=1)), private=True)  # not in the cache
    assert [r.exit_code for r in results] == [0, 0, 0, 2, 0, 2], [r.output for r in results]
    texts += [r.stdout + r.stderr for r in results]
    # the Python API with token= (a wrong one: 401 errors) and with the right one
    monkeypatch.delenv("HF_TOKEN")
    for call in (
        lambda: load_adapter("rel/private-c", token=OTHER_FAKE_TOKEN, revision="main"),
        lambda: merge([lora(tmp_path / "c")]).push_to_hub("me/denied", token=OTHER_FAKE_TOKEN),
    ):
        with pytest.raises(LoraFusionError) as caught:
            call()
        texts += [str(caught.value), repr(caught.value)]
    url = merge([load_adapter("rel/private-a", token=FAKE_TOKEN)]).push_to_hub("me/api", token=FAKE_TOKEN)
    texts.append(url)
    texts.append(caplog.text)
    blobs = [*snapshot(tmp_path).values()]
    blobs += [content for repo in ("me/pushed", "me/pushed-again", "me/api") for content in hub.repo_files(repo).values()]
    blobs += [p.read_bytes() for p in Path(os.environ["HF_HUB_CACHE"]).rglob("*") if p.is_file()]
    assert len(blobs) > 20 and caplog.records
    for token in (FAKE_TOKEN, OTHER_FAKE_TOKEN):
        assert not [t for t in texts if token in t]
        assert not [b for b in blobs if token.encode() in b]


# --------------------------------------------------------------------------------------------- determinism

DETERMINISM = [
    ("svd", {"rank": 5}),
    ("ties", {"density": 0.3}),
    ("dare_ties", {"density": 0.5, "seed": 7}),
    ("dare_ties", {"density": 0.5, "seed": 7, "space": "core"}),
]
DETERMINISM_SCRIPT = """
import json, sys
from lora_fusion import merge
sources, cases, root = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
for i, (method, options) in enumerate(cases):
    merge(sources, method=method, weights=[0.6, 0.4], **options).save_pretrained(f"{root}/{i}")
"""


def test_same_inputs_and_seed_give_byte_identical_files_across_runs_and_processes(tmp_path) -> None:
    # tests/test_cli.py::test_same_inputs_give_byte_identical_files covers svd --energy twice in one process
    sources = [str(lora(tmp_path / f"s{i}", seed=i, shapes={n: (48, 40) for n in SHAPES})) for i in (1, 2)]
    for run in ("first", "second"):
        for i, (method, options) in enumerate(DETERMINISM):
            merge(sources, method=method, weights=[0.6, 0.4], **options).save_pretrained(tmp_path / run / str(i))
    env = {**os.environ, "PYTHONHASHSEED": "12345"}  # another process, another hash seed (dict and set order)
    done = subprocess.run(
        [sys.executable, "-c", DETERMINISM_SCRIPT, json.dumps(sources), json.dumps(DETERMINISM), str(tmp_path / "other")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    first = snapshot(tmp_path / "first")
    assert len(first) == 3 * len(DETERMINISM)
    assert snapshot(tmp_path / "second") == first
    assert snapshot(tmp_path / "other") == first
    # and the seed matters where there is randomness
    merge(sources, method="dare_ties", weights=[0.6, 0.4], density=0.5, seed=8).save_pretrained(tmp_path / "seed8")
    assert (tmp_path / "seed8" / "adapter_model.safetensors").read_bytes() != first["2/adapter_model.safetensors"]
