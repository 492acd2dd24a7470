"""Atomic folders and files, manifests: a crash at any moment never leaves a half-written or damaged save."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import random
import signal
import stat
from pathlib import Path

import numpy as np
import pytest

from matryoshka2d import MatryoshkaEncoder
from matryoshka2d.io import atomic as serialization
from matryoshka2d.io.atomic import atomic_dir, atomic_open, atomic_write_json, remove_stale_siblings
from matryoshka2d.io.manifest import MANIFEST_NAME, verify_manifest, write_manifest
from tests.conftest import SENTENCES

_FORK = multiprocessing.get_context("fork")  # the children only run serialization code, no torch


def _payload(version: int) -> bytes:
    return hashlib.sha256(str(version).encode()).digest() * 8192  # 256 KiB that identify the version


def _write_version(folder: Path, version: int) -> None:
    (folder / "data.bin").write_bytes(_payload(version))
    (folder / "sub").mkdir(exist_ok=True)
    (folder / "sub" / "version.txt").write_text(str(version))
    write_manifest(folder)


def _save(final: Path, version: int) -> None:
    with atomic_dir(final, overwrite=True) as tmp:
        _write_version(tmp, version)


def _check_complete(final: Path) -> int:
    """Assert ``final`` is a complete, verified version; return that version."""
    verify_manifest(final)
    version = int((final / "sub" / "version.txt").read_text())
    assert (final / "data.bin").read_bytes() == _payload(version)
    return version


def _others(final: Path) -> list[str]:
    return sorted(p.name for p in final.parent.iterdir() if p != final)


def _dead_pid() -> int:
    child = _FORK.Process(target=os._exit, args=(0,))
    child.start()
    child.join()
    return int(child.pid)


# ----------------------------------------------------------------------------------- exceptions
@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_exception_inside_atomic_dir_keeps_the_previous_folder(tmp_path, error):
    final = tmp_path / "model"
    _save(final, 1)
    with pytest.raises(error), atomic_dir(final, overwrite=True) as tmp:
        (tmp / "data.bin").write_bytes(b"half")
        raise error("crash while writing")
    assert _check_complete(final) == 1
    assert _others(final) == []  # the temporary sibling was removed


def test_interrupted_first_save_leaves_no_folder(tmp_path):
    final = tmp_path / "model"
    with pytest.raises(RuntimeError), atomic_dir(final) as tmp:
        (tmp / "data.bin").write_bytes(b"half")
        raise RuntimeError("crash")
    assert not final.exists() and _others(final) == []


def test_existing_folder_needs_overwrite(tmp_path):
    final = tmp_path / "model"
    _save(final, 1)
    with pytest.raises(FileExistsError, match="already exists and is not empty; pass --overwrite"):
        with atomic_dir(final):
            pass
    assert _check_complete(final) == 1


# ----------------------------------------------------------------------------------- SIGKILL
def _write_forever(final: Path, started: multiprocessing.synchronize.Event) -> None:
    with atomic_dir(final, overwrite=True) as tmp, open(tmp / "big.bin", "wb") as f:
        chunk = b"x" * (1 << 20)
        f.write(chunk)
        f.flush()
        started.set()
        while True:  # a big write that never finishes: killed in the middle
            f.write(chunk)
            f.flush()
            f.seek(0)


def test_sigkill_mid_write_keeps_the_previous_folder_and_next_save_cleans_up(tmp_path):
    final = tmp_path / "model"
    _save(final, 1)
    started = _FORK.Event()
    child = _FORK.Process(target=_write_forever, args=(final, started))
    child.start()
    assert started.wait(60), "the writer never started"
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    assert child.exitcode == -signal.SIGKILL
    assert _check_complete(final) == 1
    leftovers = _others(final)
    assert len(leftovers) == 1 and leftovers[0].startswith(f".model.tmp-{child.pid}@")
    assert (tmp_path / leftovers[0] / "big.bin").stat().st_size >= 1 << 20  # it really died mid-write

    _save(final, 2)  # the next save removes what the dead writer left
    assert _check_complete(final) == 2
    assert _others(final) == []


def _save_forever(final: Path, use_exchange: bool, saved_once: multiprocessing.synchronize.Event) -> None:
    if not use_exchange:
        serialization._exchange = lambda a, b: False  # the portable two-rename path
    version = 2
    while True:
        _save(final, version)
        saved_once.set()
        version += 1


@pytest.mark.parametrize("use_exchange", [True, False], ids=["rename-exchange", "two-renames"])
def test_sigkill_at_random_moments_always_leaves_a_complete_folder(tmp_path, use_exchange):
    if use_exchange and serialization._renameat2() is None:
        pytest.skip("renameat2 is not available on this system")
    final = tmp_path / "model"
    _save(final, 1)
    rng = random.Random(0)
    for kill in range(8):
        saved_once = _FORK.Event()
        child = _FORK.Process(target=_save_forever, args=(final, use_exchange, saved_once))
        child.start()
        assert saved_once.wait(60), "the child never completed a save"
        child.join(rng.uniform(0.0, 0.2))  # then kill it at a random point of its save loop
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        assert child.exitcode == -signal.SIGKILL
        remove_stale_siblings(final)  # what the next save does first
        assert _check_complete(final) >= 2, f"kill {kill}"
        assert _others(final) == []


def test_two_rename_crash_between_renames_restores_the_previous_folder(tmp_path):
    final = tmp_path / "model"
    pid, host = _dead_pid(), serialization._host_tag()
    old = tmp_path / f".model.old-{pid}@{host}-abcd1234"  # the previous complete folder, moved aside
    old.mkdir()
    _write_version(old, 1)
    new = tmp_path / f".model.tmp-{pid}@{host}-efgh5678"  # the new one, never renamed into place
    new.mkdir()
    (new / "data.bin").write_bytes(b"partial")
    assert sorted(p.name for p in remove_stale_siblings(final)) == sorted(["model", new.name])
    assert _check_complete(final) == 1 and _others(final) == []


def test_two_rename_failure_between_renames_puts_the_previous_folder_back(tmp_path, monkeypatch):
    final = tmp_path / "model"
    _save(final, 1)
    monkeypatch.setattr(serialization, "_exchange", lambda a, b: False)
    real_replace = os.replace

    def replace(src, dst):  # the second rename (new folder into place) fails
        if Path(src).name.startswith(".model.tmp-"):
            raise OSError("disk error")
        real_replace(src, dst)

    monkeypatch.setattr(serialization.os, "replace", replace)
    with pytest.raises(OSError, match="disk error"):
        _save(final, 2)
    assert _check_complete(final) == 1 and _others(final) == []


def test_siblings_of_running_processes_or_other_hosts_are_kept(tmp_path):
    final = tmp_path / "model"
    host = serialization._host_tag()
    live = tmp_path / f".model.tmp-{os.getppid()}@{host}-live0000"  # a save in progress elsewhere
    other_host = tmp_path / f".model.tmp-{_dead_pid()}@{'0' * 8 if host != '0' * 8 else '1' * 8}-host0000"
    unrelated = tmp_path / f".model2.tmp-{_dead_pid()}@{host}-other000"  # another folder's temporary
    stale = tmp_path / f".model.tmp-{_dead_pid()}@{host}-dead0000"
    for folder in (live, other_host, unrelated, stale):
        folder.mkdir()
    _save(final, 1)
    assert _others(final) == sorted(p.name for p in (live, other_host, unrelated))


def test_stale_temporary_file_of_atomic_write_json_is_removed(tmp_path):
    path = tmp_path / "results.json"
    stale = tmp_path / f".results.json.tmp-{_dead_pid()}@{serialization._host_tag()}-abcdefgh"
    stale.write_text('{"half": ')
    atomic_write_json(path, {"spearman": 0.8, "text": "ünïcode"})
    assert json.loads(path.read_text(encoding="utf-8")) == {"spearman": 0.8, "text": "ünïcode"}
    assert _others(path) == []


def test_atomic_open_keeps_the_previous_file_on_error(tmp_path):
    path = tmp_path / "emb.npy"
    with atomic_open(path) as f:
        np.save(f, np.arange(3.0))
    with pytest.raises(RuntimeError), atomic_open(path) as f:
        f.write(b"\x93NUMPY half an array")
        raise RuntimeError("crash")
    np.testing.assert_array_equal(np.load(path), np.arange(3.0))
    assert _others(path) == []


def test_saved_files_and_folders_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_json(tmp_path / "r.json", {"a": 1})
        _save(tmp_path / "model", 1)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "r.json").stat().st_mode) == 0o644  # not mkstemp's 0600
    assert stat.S_IMODE((tmp_path / "model").stat().st_mode) == 0o755  # not mkdtemp's 0700


# ----------------------------------------------------------------------------------- manifests
@pytest.fixture()
def saved(tmp_path) -> Path:
    final = tmp_path / "model"
    _save(final, 1)
    return final


def test_manifest_lists_every_file_with_size_and_checksum(saved):
    manifest = json.loads((saved / MANIFEST_NAME).read_text())
    assert sorted(manifest["files"]) == ["data.bin", "sub/version.txt"]
    entry = manifest["files"]["data.bin"]
    assert entry == {"size": 256 * 1024, "sha256": hashlib.sha256(_payload(1)).hexdigest()}


def test_truncated_file_is_named(saved):
    data = saved / "data.bin"
    data.write_bytes(data.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"data\.bin \(1000 bytes, the manifest says 262144: truncated"):
        verify_manifest(saved)


def test_altered_byte_is_named(saved):
    data = saved / "data.bin"
    raw = bytearray(data.read_bytes())
    raw[12345] ^= 0x01
    data.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"data\.bin \(same size, different SHA-256: altered\)"):
        verify_manifest(saved)


def test_missing_file_is_named_and_every_damaged_file_is_listed(saved):
    (saved / "sub" / "version.txt").unlink()
    (saved / "data.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="2 of 2 files differ") as info:
        verify_manifest(saved)
    assert "version.txt (missing)" in str(info.value) and "data.bin (0 bytes" in str(info.value)


@pytest.mark.parametrize(("content", "message"), [
    (None, "manifest.json is missing or unreadable"),
    ('{"files": ', "manifest.json is missing or unreadable"),
    ('{"entries": []}', "is not a matryoshka2d manifest"),
    ('{"files": {"../outside": {"size": 1, "sha256": "0"}}}', "a path outside the folder"),
])
def test_missing_or_malformed_manifest_is_refused(saved, content, message):
    manifest = saved / MANIFEST_NAME
    if content is None:
        manifest.unlink()
    else:
        manifest.write_text(content)
    with pytest.raises(ValueError, match=message):
        verify_manifest(saved)


# ----------------------------------------------------------------------------------- model folders
def test_model_save_writes_a_manifest_and_load_verifies_it(tiny_model, tmp_path):
    path = tiny_model.save(tmp_path / "m")
    listed = json.loads((path / MANIFEST_NAME).read_text())["files"]
    on_disk = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
    assert sorted([*listed, MANIFEST_NAME]) == on_disk
    assert {"model.safetensors", "config.json", "matryoshka2d.json", "README.md"} <= set(listed)
    expected = tiny_model.encode(SENTENCES)
    np.testing.assert_allclose(MatryoshkaEncoder.load(path).encode(SENTENCES), expected, atol=1e-6)

    weights = path / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-5] ^= 0xFF  # a flipped bit in a tensor: safetensors itself would load it without complaint
    weights.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"model\.safetensors \(same size, different SHA-256: altered\)"):
        MatryoshkaEncoder.load(path)
    (path / MANIFEST_NAME).unlink()  # a folder edited on purpose: without a manifest it loads
    assert MatryoshkaEncoder.load(path).encode(SENTENCES).shape == expected.shape


def test_model_save_over_an_existing_model_is_atomic(tiny_model, tmp_path):
    path = tiny_model.save(tmp_path / "m")
    tiny_model.save(path, overwrite=True)
    verify_manifest(path)
    assert _others(path) == []
