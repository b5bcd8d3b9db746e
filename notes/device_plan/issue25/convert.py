"""Scratch (device, issue 25): /tmp/blob (the carried pieces, appended in order) -> the GGUF of
qwen2.5-coder-1.5b-instruct, checked against the size and sha256 of utils/models/specs.py, then converted into
$DHSA_CACHE/models/<name> with the project's own conversion (utils.models.gguf_convert.convert_gguf), built in a hidden
temp folder and renamed at the end, as utils.models.offline_model_dir does (which would fetch the wheels instead).

    python3 notes/device_plan/issue25/convert.py [/tmp/blob]
"""
import hashlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from utils.models.specs import get_spec  # noqa: E402
from utils.models.wheels import cache_dir  # noqa: E402

NAME = os.environ.get("MODEL_NAME", "qwen2.5-coder-1.5b-instruct")


def main(blob: Path) -> None:
    spec = get_spec(NAME)
    final = cache_dir() / "models" / spec.name
    if (final / "config.json").is_file():
        print(f"{final} exists already", flush=True)
        return
    size = blob.stat().st_size
    if size != spec.gguf.size:
        sys.exit(f"{blob} has {size} bytes, expected {spec.gguf.size} (a piece missing or sent twice?)")
    digest = hashlib.sha256()
    with blob.open("rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    if digest.hexdigest() != spec.gguf.sha256:
        sys.exit(f"{blob} has sha256 {digest.hexdigest()}, expected {spec.gguf.sha256}")
    print("sha ok", spec.gguf.sha256, flush=True)
    from utils.models.gguf_convert import convert_gguf

    final.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=final.parent, prefix=f".{spec.name}.tmp-") as tmp:
        gguf_dir = Path(tmp) / "gguf"
        gguf_dir.mkdir()
        gguf_path = gguf_dir / spec.gguf.filename
        shutil.move(blob, gguf_path)  # a rename on the same file system (/tmp): no second copy of 1.1 GB
        convert_gguf(gguf_path, Path(tmp) / "hf", spec.name, spec.gguf.sha256)
        (Path(tmp) / "hf").rename(final)
    print(f"converted {spec.name} into {final} in {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/blob"))
