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


# ---------------------------------------------------------------- only regular files are written (issue 24, item 1)

import seedslot.files as _files  # noqa: E402


def _specials(tmp_path):
    """A symlink to a victim file, a FIFO and a directory (a device such as /dev/null is refused by the
    same check; it is not written here: a red run as root would replace the machine's /dev/null)."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    link = tmp_path / "link.json"
    link.symlink_to(victim)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    return victim, [link, fifo, tmp_path / ""]


@pytest.mark.parametrize("which", range(3))
def test_atomic_write_refuses_anything_but_a_regular_file_and_names_it(tmp_path, which):
    victim, targets = _specials(tmp_path)
    target = targets[which]
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(ValueError) as e:
        atomic_write(target, "new")
    assert str(target).rstrip("/") in str(e.value) and ".tmp" not in str(e.value) and "\n" not in str(e.value)
    assert "regular file" in str(e.value) or "not a file path" in str(e.value)
    assert sorted(os.listdir(tmp_path)) == before and victim.read_text() == "precious"
    assert os.path.islink(tmp_path / "link.json")


def test_a_failed_rename_names_the_users_path_not_the_temporary(tmp_path, monkeypatch):
    path = tmp_path / "out.json"

    def denied(src, dst):
        raise PermissionError(13, "Permission denied", src)

    monkeypatch.setattr(os, "replace", denied)
    with pytest.raises(OSError) as e:
        atomic_write(path, "x")
    assert str(path) in str(e.value) and ".tmp" not in str(e.value)
    assert os.listdir(tmp_path) == []


def test_append_never_follows_a_symlink_nor_writes_a_device(tmp_path):
    victim, targets = _specials(tmp_path)
    for target in (targets[0], targets[1]):
        with pytest.raises(ValueError, match="regular file"):
            _files.append_text(target, "line\n")
    assert victim.read_text() == "precious"
    _files.append_text(tmp_path / "m.jsonl", "a\n")
    _files.append_text(tmp_path / "m.jsonl", "b\n")
    assert (tmp_path / "m.jsonl").read_text() == "a\nb\n"


def test_read_regular_refuses_devices_fifos_and_oversized_files(tmp_path):
    _, targets = _specials(tmp_path)
    for target in (targets[1], "/dev/zero", tmp_path):
        with pytest.raises(ValueError, match="regular file"):
            _files.read_regular(target)
    (tmp_path / "big").write_bytes(b"x" * 100)
    with pytest.raises(ValueError, match="at most 99"):
        _files.read_regular(tmp_path / "big", max_bytes=99)
    assert _files.read_regular(tmp_path / "big", max_bytes=100) == b"x" * 100
