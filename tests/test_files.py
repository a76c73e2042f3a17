"""Every file fastldm writes is written atomically and ends with the user's normal permissions (0666 filtered by
the umask), never the private 0600 of a temporary file; a failed write leaves nothing."""
from __future__ import annotations

import os

import pytest
from click.testing import CliRunner
from PIL import Image

from fastldm.cli import main
from fastldm.files import atomic_write, atomic_write_bytes
from fastldm.images import save_png


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path) -> int:
    return path.stat().st_mode & 0o777


def test_atomic_write_has_normal_permissions_and_leaves_nothing_on_failure(tmp_path, umask_022):
    assert _mode(atomic_write_bytes(tmp_path / "a.bin", b"x")) == 0o644
    os.umask(0o077)
    assert _mode(atomic_write_bytes(tmp_path / "b.bin", b"x")) == 0o600   # the user's umask is obeyed
    with pytest.raises(ZeroDivisionError):
        atomic_write(tmp_path / "c.bin", lambda tmp: 1 / 0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "b.bin"]


def test_png_writer(tmp_path, umask_022):
    assert _mode(save_png(Image.new("RGB", (4, 4)), tmp_path / "x.png", "a cube")) == 0o644


def test_cli_outputs_are_readable_by_others(tmp_path, umask_022):
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["generate", "a red cube", "--steps", "2", "--seed", "1", "--export", "glb",
                                    "--out", str(out)])
    assert res.exit_code == 0, res.output
    files = sorted(out.iterdir())
    assert [f.suffix for f in files] == [".png", ".glb", ".png"]        # image, 3-D scene, depth
    assert all(_mode(f) == 0o644 for f in files)
