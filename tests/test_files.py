"""The file-safety and output-policy helpers, in-process: whole files or none, links written through, special
files never replaced, and every output path checked before any work (``wordlm.files``, ``wordlm.checks``)."""

from __future__ import annotations

import os
import stat

import pytest

from wordlm.checks import Output, check_output, write_output
from wordlm.errors import UserError
from wordlm.files import atomic_file, atomic_path, output_kind, same_file, write_target, write_through


def leftovers(folder) -> list[str]:
    return sorted(name for name in os.listdir(folder) if name.endswith(".part"))


def test_a_write_that_fails_leaves_the_previous_file_and_no_temporary_one(tmp_path):
    target = tmp_path / "m.pt"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_file(target) as stream:
        stream.write(b"half of the new")
        raise RuntimeError("the writer failed midway")
    assert target.read_bytes() == b"old" and leftovers(tmp_path) == []
    with atomic_file(target, mode=0o600) as stream:
        stream.write(b"new")
    assert target.read_bytes() == b"new" and leftovers(tmp_path) == []
    assert stat.S_IMODE(target.stat().st_mode) == 0o600


def test_a_symbolic_link_is_written_through_and_stays_a_link(tmp_path):
    (tmp_path / "real").mkdir()
    real = tmp_path / "real" / "model.pt"
    real.write_bytes(b"old")
    link = tmp_path / "link.pt"
    link.symlink_to(real)
    assert write_target(link) == real
    with atomic_file(link) as stream:
        stream.write(b"new")
    assert link.is_symlink() and real.read_bytes() == b"new"
    assert leftovers(tmp_path) == [] and leftovers(tmp_path / "real") == []


def test_a_link_loop_and_a_dangling_link(tmp_path):
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    with pytest.raises(OSError):
        write_target(loop)
    dangling = tmp_path / "dangling.pt"
    dangling.symlink_to(tmp_path / "not-yet.pt")
    assert output_kind(dangling) == "new"
    with atomic_file(dangling) as stream:
        stream.write(b"made")
    assert (tmp_path / "not-yet.pt").read_bytes() == b"made" and dangling.is_symlink()


def test_special_files_are_never_replaced(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    assert output_kind(fifo) == "a FIFO" and output_kind(tmp_path) == "a folder"
    assert output_kind("/dev/null") == "a character device" and output_kind(tmp_path / "x") == "new"
    for path in (fifo, tmp_path):
        with pytest.raises(OSError, match="never replaced"), atomic_file(path):
            pass
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    with pytest.raises(OSError) as caught:  # no reader: refused at once instead of waiting forever
        write_through(fifo, b"text")
    assert caught.value.errno == 6  # ENXIO
    write_through("/dev/null", b"into a device as it is")


def test_atomic_path_moves_every_file_the_writer_made(tmp_path):
    target = tmp_path / "model.onnx"
    with atomic_path(target) as name:
        name.write_bytes(b"graph")
        (name.parent / "model.onnx.data").write_bytes(b"weights")  # a writer's side file, named after its own
    assert target.read_bytes() == b"graph" and (tmp_path / "model.onnx.data").read_bytes() == b"weights"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    with pytest.raises(ValueError), atomic_path(target) as name:
        name.write_bytes(b"broken")
        raise ValueError("export failed")
    assert target.read_bytes() == b"graph"


def test_same_file_follows_links_and_hard_links(tmp_path):
    first = tmp_path / "a.txt"
    first.write_text("x")
    (tmp_path / "hard.txt").hardlink_to(first)
    (tmp_path / "soft.txt").symlink_to(first)
    assert same_file(first, tmp_path / "hard.txt") and same_file(first, tmp_path / "soft.txt")
    assert not same_file(first, tmp_path / "missing.txt") and not same_file(first, "\0bad")


def test_check_output_refuses_before_any_work_in_one_line(tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "afile").write_text("x")
    os.mkfifo(tmp_path / "pipe")
    corpus = tmp_path / "train.txt"
    corpus.write_text("the corpus\n")
    refused = {
        "folder": r"is a folder; give a file path such as",
        "afile/m.pt": r"is a file, not a folder",
        "pipe": r"is a FIFO, not a file; save must name a file \(it is written to a temporary file",
        "": r"must be a file path",
    }
    for name, message in refused.items():
        with pytest.raises(UserError, match=message) as caught:
            check_output("save", str(tmp_path / name) if name else "", example="model.pt", text=False)
        assert "\n" not in str(caught.value)
    with pytest.raises(UserError, match="is the same file as the corpus, which this command reads"):
        check_output("outf", str(corpus), inputs=(("the corpus", str(corpus)),))
    assert corpus.read_text() == "the corpus\n"


def test_check_output_makes_the_folder_and_says_what_a_path_is(tmp_path):
    output = check_output("outf", str(tmp_path / "new" / "deep" / "out.txt"))
    assert output == Output("outf", str(tmp_path / "new" / "deep" / "out.txt"), "file")
    assert (tmp_path / "new" / "deep").is_dir()
    os.mkfifo(tmp_path / "pipe")
    assert check_output("outf", str(tmp_path / "pipe")).kind == "special"  # text goes into a FIFO as it is
    assert check_output("outf", "/dev/null").kind == "special"


def test_write_output_writes_whole_files_and_says_why_a_fifo_failed(tmp_path):
    output = check_output("outf", str(tmp_path / "out.txt"))
    write_output(output, "first\n")
    write_output(output, "second\n")
    assert (tmp_path / "out.txt").read_text() == "second\n" and leftovers(tmp_path) == []
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(UserError, match="no process reads that FIFO; start its reader first"):
        write_output(check_output("outf", str(tmp_path / "pipe")), "text")


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.isdir("/proc/self"), reason="needs root and /proc")
def test_a_folder_where_nothing_can_be_made_is_refused_even_for_root(tmp_path):
    # os.access says root may write anywhere; /proc accepts no new file: the check tries to make one
    with pytest.raises(UserError, match=r"its folder /proc is not writable"):
        check_output("save", "/proc/m.pt", example="model.pt", text=False)
