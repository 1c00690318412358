"""Atomic writes: a file or directory appears whole or not at all; on failure the old one stays."""

import pytest

from darl_infer.atomic import atomic_dir, atomic_file


class Interrupt(KeyboardInterrupt):
    pass


def test_atomic_file_replaces_only_on_success(tmp_path):
    target = tmp_path / "out.jsonl"
    target.write_text("old\n")
    for failure in (RuntimeError("disk full"), Interrupt()):
        with pytest.raises(type(failure)):
            with atomic_file(target) as f:
                f.write("half of the new")
                assert target.read_text() == "old\n"  # the target is untouched while writing
                raise failure
        assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"] and target.read_text() == "old\n"
    with atomic_file(target) as f:
        f.write("new\n")
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"] and target.read_text() == "new\n"
    with atomic_file(tmp_path / "b.bin", "wb") as f:
        f.write(b"\x00\xff")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\xff"


def test_atomic_dir_replaces_only_on_success(tmp_path):
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "weights").write_text("old")
    with pytest.raises(Interrupt):
        with atomic_dir(target, replace=True) as d:
            (d / "weights").write_text("new")
            raise Interrupt()
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"] and (target / "weights").read_text() == "old"
    with atomic_dir(target, replace=True) as d:
        (d / "weights").write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"] and (target / "weights").read_text() == "new"


def test_atomic_dir_without_replace_refuses_a_non_empty_target_before_any_work(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    with pytest.raises(FileExistsError, match="full: exists and is not empty"):
        with atomic_dir(tmp_path / "full"):
            pytest.fail("the block must not run")
    (tmp_path / "empty").mkdir()
    with atomic_dir(tmp_path / "empty") as d:
        (d / "y").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "full"] and (tmp_path / "empty" / "y").is_file()
