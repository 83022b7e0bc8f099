"""The loader's own tar reader (`tar.fast_tar`) against Python's tarfile, on every archive shape a
shard can have: what it reads itself must equal tarfile, what it cannot read it hands over, and damage
is an error, never a silently shorter shard."""
from __future__ import annotations

import gzip
import io
import tarfile

import pytest

from lightning_clip.data import tar as T


def _tar(members, fmt=tarfile.PAX_FORMAT, mtime=0, extra=None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), mtime
            tar.addfile(info, io.BytesIO(data))
            if extra is not None and name == extra[0]:
                tar.addfile(extra[1])
    return buf.getvalue()


SAMPLES = [(f"{k:09d}.{ext}", f"{k}-{ext}".encode() * (k + 1) * 37) for k in range(5) for ext in ("jpg", "txt", "json")]


def _reference(raw: bytes):
    return list(T.tarfile_members(io.BytesIO(raw)))


def _fast_only(raw: bytes):
    """The fast reader alone: fails the test if it hands anything over."""
    return list(T.fast_tar(io.BytesIO(raw)))


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_plain_archives_read_alone_equal_tarfile(fmt):
    raw = _tar(SAMPLES, fmt)
    assert _fast_only(raw) == _reference(raw) == SAMPLES


def test_pax_headers_per_member_are_understood():
    # webdataset's TarWriter stamps float mtimes, which tarfile writes as a pax header before each member;
    # a long path and non-ASCII names too
    members = SAMPLES[:3] + [("d/" * 60 + "000000009.jpg", b"x" * 700), ("000000010.txt", "éü".encode() * 3)]
    raw = _tar(members, mtime=1700000000.25)
    assert b"path=" in raw and b"mtime=" in raw  # the case is really the pax one
    assert _fast_only(raw) == _reference(raw) == members


def test_ustar_prefix_field_joins_the_name():
    name = "a" * 80 + "/" + "b" * 60 + "/000000001.jpg"  # > 100 characters, fits prefix + name
    raw = _tar([(name, b"img")], tarfile.USTAR_FORMAT)
    assert _fast_only(raw) == [(name, b"img")]


def test_directories_are_skipped_like_tarfile():
    d = tarfile.TarInfo("sub")
    d.type = tarfile.DIRTYPE
    raw = _tar(SAMPLES[:3], extra=(SAMPLES[0][0], d))
    assert _fast_only(raw) == _reference(raw) == SAMPLES[:3]


@pytest.mark.parametrize("case", ["gzip", "gnu_longname", "symlink_after_pax"])
def test_what_it_cannot_read_is_handed_to_tarfile(case):
    if case == "gzip":
        raw = gzip.compress(_tar(SAMPLES))
    elif case == "gnu_longname":
        raw = _tar(SAMPLES[:3] + [("x" * 150 + ".jpg", b"long")], tarfile.GNU_FORMAT)
    else:
        link = tarfile.TarInfo("l" * 120)  # a long link name: a pax header in front of the symlink
        link.type, link.linkname = tarfile.SYMTYPE, "t" * 120
        raw = _tar(SAMPLES[:6], extra=(SAMPLES[2][0], link))
    with pytest.raises(T.HandOver):
        _fast_only(raw)
    assert list(T.members(io.BytesIO(raw))) == _reference(raw)


def test_truncation_and_damage_are_errors_with_the_samples_before_kept():
    raw = _tar(SAMPLES)
    headers = [i for i in range(0, len(raw), 512) if raw[i + 257:i + 262] == b"ustar"]
    cut = raw[:headers[8] + 512 + 10]  # inside the ninth member's data
    got = []
    with pytest.raises(tarfile.TarError, match="unexpected end of data|truncated header"):
        for m in T.fast_tar(io.BytesIO(cut)):
            got.append(m)
    assert len(got) == 8 and got == SAMPLES[:8]
    damaged = bytearray(raw)
    damaged[headers[1] + 3] ^= 0xFF  # a byte of the second member's name
    with pytest.raises(tarfile.HeaderError, match="checksum"):
        list(T.fast_tar(io.BytesIO(bytes(damaged))))


def test_a_real_shard_reads_the_same_both_ways(tmp_path):
    from lightning_clip.data import synthetic as syn

    world = syn.generate(tmp_path / "w", num_train=20, num_val=4, seed=3)
    shard = sorted((world / "train").glob("*.tar"))[0]
    raw = shard.read_bytes()
    assert _fast_only(raw) == _reference(raw) and len(_reference(raw)) > 0
