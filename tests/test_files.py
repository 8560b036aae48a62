"""files.atomic_write: the old file or the complete new one, never a temporary left behind."""

import os

import pytest

from seedslot.files import atomic_write, remove_stale_temporaries


@pytest.mark.parametrize("data, content", [("text é\n", "text é\n".encode()), (b"\x00\x01", b"\x00\x01"),
                                           ([b"ab", bytearray(b"cd"), memoryview(b"ef")], b"abcdef")])
def test_atomic_write_writes_text_bytes_and_buffers(tmp_path, data, content):
    path = tmp_path / "f.json"
    atomic_write(path, data)
    assert path.read_bytes() == content and os.listdir(tmp_path) == ["f.json"]


def test_atomic_write_keeps_permissions_and_the_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "summary.json"
    atomic_write(path, "old")
    os.chmod(path, 0o600)
    atomic_write(str(path), "new")
    assert path.read_text() == "new" and os.stat(path).st_mode & 0o777 == 0o600

    def boom(*args):
        raise OSError("simulated crash in fsync")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError, match="simulated crash"):
        atomic_write(path, "newer")
    monkeypatch.undo()
    assert path.read_text() == "new" and os.listdir(tmp_path) == ["summary.json"]


def test_stale_temporaries_of_one_file_are_removed(tmp_path):
    for name in (".metrics.jsonl.x1.tmp", ".last.ckpt.x2.tmp", "metrics.jsonl"):
        (tmp_path / name).write_text("")
    assert remove_stale_temporaries(tmp_path / "metrics.jsonl") == [str(tmp_path / ".metrics.jsonl.x1.tmp")]
    assert sorted(os.listdir(tmp_path)) == [".last.ckpt.x2.tmp", "metrics.jsonl"]
