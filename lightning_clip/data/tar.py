"""The tar member reader under `lightning_clip.data.shards`: a fast path for the archives that
webdataset/img2dataset writers produce, Python's `tarfile` for everything else, and the header scan that
finds the members a damaged archive cut off."""
from __future__ import annotations

import tarfile
from pathlib import Path
from typing import Iterator


class _Prepended:
    """A stream with some bytes already read from it put back in front (for handing over to tarfile)."""

    def __init__(self, head: bytes, stream):
        self._head, self._stream = head, stream

    def read(self, n: int = -1) -> bytes:
        if not self._head:
            return self._stream.read(n)
        if n is None or n < 0:
            out, self._head = self._head + self._stream.read(), b""
            return out
        out, self._head = self._head[:n], self._head[n:]
        return out + (self._stream.read(n - len(out)) if len(out) < n else b"")


class HandOver(Exception):
    """The archive uses a feature the fast reader leaves to tarfile; ``head`` is what was read of it."""

    def __init__(self, head: bytes):
        self.head = head


def _octal(field: bytes, what: str) -> int:
    digits = field.split(b"\0", 1)[0].strip()
    try:
        return int(digits or b"0", 8)
    except ValueError:
        raise tarfile.HeaderError(f"invalid {what} field {field!r}") from None


def _pax_records(data: bytes) -> dict[str, bytes]:
    """``"%d %s=%s\\n"`` records of a POSIX pax extended header."""
    out, pos = {}, 0
    while pos < len(data) and data[pos:pos + 1] != b"\0":
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1:pos + length - 1].partition(b"=")
        out[key.decode("utf-8", "replace")] = value
        pos += length
    return out


REGULAR = (b"0", b"\0", b"7")  # regular file, old-style regular file, contiguous file (tarfile: isreg)


def fast_tar(stream) -> Iterator[tuple[str, bytes]]:
    """(name, data) of each regular file in an uncompressed ustar/pax archive, header by header.

    Python's `tarfile` spends several times more Python on every member (three per sample) than this
    reader (`benchmarks/data_throughput.py` compares them). It reads the 512-byte headers directly,
    validates their checksums, and understands what webdataset/img2dataset writers produce (plain ustar
    members, pax ``x`` headers carrying ``path``/``size``). Anything else (compression, GNU long names,
    global pax headers, base-256 sizes, pre-POSIX archives) raises `HandOver` with the bytes read of the
    current header, so `members` hands the rest of the archive to tarfile."""
    pending: dict[str, bytes] = {}
    pending_raw = b""  # the pax header block(s) in front of the next member, in case it is handed over
    first = True
    while True:
        header = stream.read(512)
        if first and (len(header) < 512 or header[257:262] != b"ustar"):
            raise HandOver(header)  # compressed, empty, or a pre-POSIX tar: tarfile decides
        if not header or header == b"\0" * 512:
            if pending:
                raise tarfile.ReadError("archive ends after a pax header")
            return  # end of archive (or of a stream without its end blocks, which tarfile accepts too)
        if len(header) < 512:
            raise tarfile.ReadError(f"truncated header ({len(header)} of 512 bytes)")
        if header[257:262] != b"ustar":
            raise tarfile.HeaderError("bad magic in a member header")
        first = False
        stored = _octal(header[148:156], "checksum")
        if stored != sum(header) - sum(header[148:156]) + 8 * 32:
            raise tarfile.HeaderError("bad checksum in a member header")
        kind = header[156:157]
        if kind not in REGULAR + (b"x", b"5") or header[124] & 0x80:
            # links, GNU long names, global pax headers, sparse files, base-256 sizes (over 8 GiB)
            raise HandOver(pending_raw + header)
        size = _octal(header[124:136], "size")
        if "size" in pending:
            size = int(pending["size"])
        data = stream.read(size)
        if len(data) < size:
            raise tarfile.ReadError(f"unexpected end of data ({len(data)} of {size} bytes)")
        padding = stream.read(-size % 512)
        if len(padding) < -size % 512:  # tarfile counts a member without its block padding as truncated
            raise tarfile.ReadError("unexpected end of data (in a member's block padding)")
        if kind == b"x":
            pending = _pax_records(data)
            pending_raw = header + data + padding
            continue
        if "path" in pending:
            name = pending["path"].decode("utf-8", "surrogateescape")
        else:
            name = header[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            prefix = header[345:500].split(b"\0", 1)[0] if header[257:265] == b"ustar\x0000" else b""
            if prefix:
                name = prefix.decode("utf-8", "surrogateescape") + "/" + name
        pending, pending_raw = {}, b""
        if kind != b"5":
            yield name, data


def tarfile_members(stream) -> Iterator[tuple[str, bytes]]:
    with tarfile.open(fileobj=stream, mode="r|*") as tar:
        for info in tar:
            if info.isreg():
                yield info.name, tar.extractfile(info).read()


def members(stream) -> Iterator[tuple[str, bytes]]:
    """Regular files of a tar stream: the fast reader while it can, then tarfile for the rest."""
    try:
        yield from fast_tar(stream)
    except HandOver as h:
        yield from tarfile_members(_Prepended(h.head, stream))



def names_after(path: str, start: int) -> set[str]:
    """Names of the regular-file member headers found in the local tar ``path`` from byte ``start`` on
    (checksums valid, at 512-byte boundaries): the members a corrupt header in the middle cut off from
    the reader. An unreadable file gives the names found so far."""
    names: set[str] = set()
    try:
        with open(path, "rb") as f:
            f.seek(-(-start // 512) * 512)
            while True:
                chunk = f.read(1 << 20)  # a multiple of 512: block boundaries stay aligned
                if not chunk:
                    return names
                pos = chunk.find(b"ustar", 257)
                while pos != -1:
                    if pos % 512 == 257:
                        h = chunk[pos - 257:pos - 257 + 512]
                        if len(h) == 512 and _octal(h[148:156], "checksum") == sum(h) - sum(h[148:156]) + 256:
                            if h[156:157] in REGULAR:
                                names.add(h[:100].split(b"\0", 1)[0].decode("utf-8", "replace"))
                    pos = chunk.find(b"ustar", pos + 1)
    except (OSError, tarfile.TarError):
        return names


def content_size(path: Path) -> int:
    """Bytes of a tar up to its end-of-archive blocks and record padding (zeros), in 512-byte blocks."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        f.seek(max(0, size - 12 * 1024))  # end blocks (1 KiB) plus at most one 10 KiB record of padding
        tail = f.read()
    return -(-(size - (len(tail) - len(tail.rstrip(b"\0")))) // 512) * 512
