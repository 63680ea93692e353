"""An ImageNet-style tree (see ``data.layout``) read straight from a .tar or .tar.gz, without extracting it.

A plain .tar is indexed once (member name → data offset and size) and each image is then read with one
positioned read. gzip streams are not seekable (reaching member k means inflating everything before it), so
a .tar.gz is first decompressed, once, into a cached plain .tar and read the same way. Cache files live in
``$EFFNET_CACHE_DIR/tar`` (default ``~/.cache/effnet-ipu/tar``), named by the source's path, size and
modification time, so an edited archive gets a new cache entry; delete the folder to reclaim the space.
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import os
import shutil
import tarfile
import tempfile
import zlib
from pathlib import Path
from typing import IO, Any, Callable, Dict, List, NamedTuple, Optional

import numpy as np

from data.encoded import EncodedImageDataset
from data.errors import DataError
from data.layout import SPLIT_DIRS, class_list, is_image, label_files, pick_split_dir
from data.transforms import Preprocessing

GZIP_MAGIC = b"\x1f\x8b"
INDEX_FORMAT = "index-v1"  # change when TarIndex changes, so stale cached indexes are not read
Writer = Callable[[IO[bytes]], None]


def cache_dir() -> Path:
    """Where decompressed archives and indexes go; ``EFFNET_CACHE_DIR`` moves it (tests use a temp dir)."""
    return Path(os.environ.get("EFFNET_CACHE_DIR") or Path.home() / ".cache" / "effnet-ipu") / "tar"


def _cache_stem(source: str) -> str:
    """``<archive name>-<hash of absolute path, size, mtime>``: one cache entry per version of an archive."""
    stat = os.stat(source)
    key = f"{os.path.abspath(source)}\0{stat.st_size}\0{stat.st_mtime_ns}"
    return f"{Path(source).name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def _write_atomically(target: Path, write: Writer) -> None:
    """``write(file)`` into a temporary file next to ``target``, renamed over it only once complete, so a
    killed process never leaves a truncated cache entry behind."""
    tmp = tempfile.NamedTemporaryFile(dir=target.parent, prefix=target.name + ".", suffix=".part", delete=False)
    try:
        with tmp:
            write(tmp)
        os.replace(tmp.name, target)
    except BaseException:
        os.unlink(tmp.name)
        raise


def _cached(target: Path, write: Writer) -> Path:
    """``target``, created by ``write`` unless present. A lock file makes ranks that start together wait for
    one of them instead of all doing the same (possibly minutes-long) work."""
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / (target.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.exists():
            _write_atomically(target, write)
    return target


def plain_tar(source: str) -> str:
    """``source`` itself if it is an uncompressed tar, else its cached decompressed copy."""
    with open(source, "rb") as f:
        if f.read(2) != GZIP_MAGIC:
            return source

    def decompress(out: IO[bytes]) -> None:
        try:
            with gzip.open(source, "rb") as src:
                shutil.copyfileobj(src, out, 1 << 20)
        except (OSError, EOFError, zlib.error) as err:
            raise DataError(f"tar data set: cannot decompress {source}: {err}") from err

    return str(_cached(cache_dir() / (_cache_stem(source) + ".tar"), decompress))


def _normalise(name: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    return name.strip("/")


class TarIndex(NamedTuple):
    """Every directory and regular file of a tar: name, and for files where their bytes are."""

    names: np.ndarray    # bytes, normalised member names
    offsets: np.ndarray  # int64, data offset in the uncompressed tar
    sizes: np.ndarray    # int64, data size
    is_dir: np.ndarray   # bool

    @classmethod
    def scan(cls, source: str, tar_path: str) -> "TarIndex":
        names: List[bytes] = []
        offsets: List[int] = []
        sizes: List[int] = []
        is_dir: List[bool] = []
        try:
            with tarfile.open(tar_path, "r:") as archive:
                for member in archive:
                    if member.isfile() or member.isdir():
                        names.append(os.fsencode(_normalise(member.name)))
                        offsets.append(member.offset_data)
                        sizes.append(member.size)
                        is_dir.append(member.isdir())
        except (tarfile.TarError, OSError, EOFError) as err:
            raise DataError(f"tar data set: {source} is not a readable tar archive: {err}") from err
        return cls(np.array(names, dtype=bytes), np.array(offsets, dtype=np.int64),
                   np.array(sizes, dtype=np.int64), np.array(is_dir, dtype=bool))

    @classmethod
    def load(cls, source: str, tar_path: str) -> "TarIndex":
        """The index, from the cache or by one scan of the archive's headers (seconds per 100k members)."""

        def write(out: IO[bytes]) -> None:
            np.savez(out, **cls.scan(source, tar_path)._asdict())

        path = _cached(cache_dir() / f"{_cache_stem(source)}.{INDEX_FORMAT}.npz", write)
        with np.load(path) as saved:
            return cls(**{field: saved[field] for field in cls._fields})


class PositionalReader:
    """Reads byte ranges of one file with ``os.pread``: no shared file position, so forked workers can share
    an inherited descriptor; a pickled copy (spawned worker) opens its own on first use."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: Optional[int] = None

    def read(self, offset: int, size: int) -> bytes:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        data = os.pread(self._fd, size, offset)
        if len(data) != size:
            raise OSError(f"{self.path} ended after {len(data)} of {size} bytes at offset {offset}")
        return data

    def __getstate__(self) -> Dict[str, Any]:
        return {"path": self.path}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.path = state["path"]
        self._fd = None

    def __del__(self) -> None:
        if self._fd is not None:
            os.close(self._fd)


def _class_folders(names: List[str], is_dir: np.ndarray, split_prefix: str) -> Dict[str, Dict[str, int]]:
    """Class folder → {image file name → index row} for the members under ``split_prefix`` (``[root/]split/``).
    A folder counts even when it holds no images, so that it can be reported as empty."""
    folders: Dict[str, Dict[str, int]] = {}
    for row, name in enumerate(names):
        if not name.startswith(split_prefix):
            continue
        parts = name[len(split_prefix):].split("/")
        if len(parts) >= 2 or is_dir[row]:
            files = folders.setdefault(parts[0], {})
            if len(parts) == 2 and not is_dir[row] and is_image(parts[1]):
                files[parts[1]] = row
    return folders


class TarDataset(EncodedImageDataset):
    """The tree may sit at the archive's top level or inside one top-level folder (``imagenet/train/...``)."""

    def __init__(self, source: str, split: str, transform: Preprocessing, skip_corrupt: bool = False) -> None:
        if not os.path.isfile(source):
            raise DataError(f"tar data set: {source} does not exist (expected a .tar or .tar.gz holding "
                            "train/<class>/*.jpg and val/<class>/*.jpg or test/<class>/*.jpg)")
        tar_path = plain_tar(source)
        index = TarIndex.load(source, tar_path)
        names = [os.fsdecode(n) for n in index.names]
        prefix = self._tree_prefix(names)
        top_level = {n[len(prefix):].split("/")[0] for n in names if n.startswith(prefix)}
        split_dir = pick_split_dir(split, top_level, f"{source}:{prefix[:-1]}" if prefix else source)
        where = f"{source}:{prefix}{split_dir}"
        folders = _class_folders(names, index.is_dir, f"{prefix}{split_dir}/")
        if "train" not in top_level:
            classes = class_list(None, folders, where)
        elif split_dir == "train":
            classes = class_list(folders, folders, where)
        else:
            classes = class_list(_class_folders(names, index.is_dir, f"{prefix}train/"), folders,
                                 f"{source}:{prefix}train")
        keys, labels = label_files({name: list(files) for name, files in folders.items()}, classes, where)
        rows = np.array([folders[name][file] for name, file in (k.split("/", 1) for k in keys)], dtype=np.int64)
        self._members = index.names[rows]
        self._offsets = index.offsets[rows]
        self._sizes = index.sizes[rows]
        self._reader = PositionalReader(tar_path)
        self.archive = source
        super().__init__(classes, labels, transform, skip_corrupt, source=where)

    @staticmethod
    def _tree_prefix(names: List[str]) -> str:
        """``""`` when the split folders are at the top level, ``"<folder>/"`` when all sit in one folder."""
        top = {n.split("/")[0] for n in names}
        split_names = {d for dirs in SPLIT_DIRS.values() for d in dirs}
        if len(top) == 1 and not top & split_names:
            return f"{top.pop()}/"
        return ""

    def _name(self, j: int) -> str:
        return f"{self.archive}:{os.fsdecode(self._members[j])}"

    def _read(self, j: int) -> bytes:
        return self._reader.read(int(self._offsets[j]), int(self._sizes[j]))
