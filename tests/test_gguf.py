"""GGUF files as MODEL_NAME: the content-keyed cache, written atomically, converted once (no process, no model)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from llmapi import checkpoint
from llmapi.engine import from_gguf as gguf


def fake_gguf(folder: Path, content: bytes = b"weights") -> Path:
    """A file that passes the magic check (the conversion itself is replaced in these tests)."""
    path = folder / "model.Q4_1.gguf"
    path.write_bytes(gguf.MAGIC + content)
    return path


@pytest.fixture
def conversions(monkeypatch) -> list[Path]:
    """Replace the conversion by a slow one that writes a folder, and record where each call wrote."""
    calls: list[Path] = []

    def convert(path: str, out: Path, *, dtype: str, sha256: str = "") -> None:
        calls.append(Path(out))
        Path(out).mkdir(parents=True)
        time.sleep(0.2)  # long enough for the other threads to find no complete folder and wait for the lock
        (Path(out) / "model.safetensors").write_text(dtype)
        (Path(out) / gguf.MARKER).write_text("{}")

    monkeypatch.setattr(gguf, "convert", convert)
    return calls


def test_gguf_names_are_recognised_by_suffix():
    assert gguf.is_gguf("models/x.Q4_1.gguf") and gguf.is_gguf("/m/X.GGUF")
    assert not gguf.is_gguf("models/tiny-gpt2") and not gguf.is_gguf("org/model-gguf")


def test_gguf_concurrent_loads_convert_once_and_share_the_folder(tmp_path, conversions):
    path = fake_gguf(tmp_path)
    results: list[tuple[Path, bool]] = []
    threads = [
        threading.Thread(
            target=lambda: results.append(gguf.ensure_converted(str(path), dtype="float32", root=tmp_path / "c"))
        )
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(conversions) == 1
    assert sorted(converted for _, converted in results) == [False, False, False, True]
    folder = results[0][0]
    assert {found for found, _ in results} == {folder} and gguf.is_complete(folder)
    assert (folder / "model.safetensors").read_text() == "float32"
    assert not list((tmp_path / "c").glob(".*.partial"))


def test_gguf_cache_is_keyed_by_content_and_dtype(tmp_path, conversions):
    for name in "abc":
        (tmp_path / name).mkdir()
    first, copy = fake_gguf(tmp_path / "a"), fake_gguf(tmp_path / "b")
    root = tmp_path / "cache"
    folder, converted = gguf.ensure_converted(str(first), dtype="float32", root=root)
    assert converted
    # The same bytes elsewhere reuse the conversion; another dtype or other bytes get their own.
    assert gguf.ensure_converted(str(copy), dtype="float32", root=root) == (folder, False)
    assert gguf.ensure_converted(str(first), dtype="bfloat16", root=root)[1]
    other = fake_gguf(tmp_path / "c", b"other weights")
    assert gguf.ensure_converted(str(other), dtype="float32", root=root)[1]
    assert len(conversions) == 3


def test_gguf_a_crashed_conversion_is_never_used_and_is_redone(tmp_path, monkeypatch):
    path = fake_gguf(tmp_path)
    root = tmp_path / "cache"

    def crash(path: str, out: Path, *, dtype: str, sha256: str = "") -> None:
        Path(out).mkdir(parents=True)
        (Path(out) / "model.safetensors").write_text("half")
        raise OSError("disk full")

    monkeypatch.setattr(gguf, "convert", crash)
    with pytest.raises(OSError, match="disk full"):
        gguf.ensure_converted(str(path), dtype="float32", root=root)
    assert not [p for p in root.iterdir() if gguf.is_complete(p)]
    # A folder that lost its marker (a copy cut short) is not complete either, and the next load converts again.
    target = gguf.cache_folder(str(path), gguf.digest(str(path)), dtype="float32", root=root)
    target.mkdir()
    (target / "model.safetensors").write_text("half")

    def finish(path: str, out: Path, *, dtype: str, sha256: str = "") -> None:
        Path(out).mkdir(parents=True)
        (Path(out) / "model.safetensors").write_text("whole")
        (Path(out) / gguf.MARKER).write_text("{}")

    monkeypatch.setattr(gguf, "convert", finish)
    assert gguf.ensure_converted(str(path), dtype="float32", root=root) == (target, True)
    assert (target / "model.safetensors").read_text() == "whole"


@pytest.mark.parametrize(
    ("content", "reason"), [(None, "cannot read the GGUF file"), (b"PK\x03\x04zip", "not a GGUF file")]
)
def test_gguf_a_missing_or_foreign_file_is_refused_by_name(tmp_path, content, reason):
    path = tmp_path / "model.gguf"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(gguf.GGUFError, match=reason) as refused:
        gguf.ensure_converted(str(path), dtype="float32", root=tmp_path / "cache")
    assert str(path) in str(refused.value)


def test_gguf_parameters_are_bounded_by_the_file_size_without_reading_it(tmp_path):
    path = fake_gguf(tmp_path, b"\0" * 4_000_000)
    assert checkpoint.parameters(str(path)) == (4_000_000 + 4) // 4
