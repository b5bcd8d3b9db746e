"""Scratch (device): split /tmp/blob back into the three GGUF files, check sha256, convert each into
$DHSA_CACHE/models/<name> with the project's own GGUF conversion."""
import hashlib, os, sys, time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

PARTS = [("qwen2.5-coder-1.5b-instruct", 1117320768, "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"),
         ("gemma-3-270m", 253113024, "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
         ("smollm2-135m", 98362432, "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53")]


def convert(args):
    name, path, sha = args
    from utils.models import _convert_gguf
    t = time.time()
    out = Path(os.environ["DHSA_CACHE"]) / "models" / name
    _convert_gguf(Path(path), out, name, sha)
    return name, round(time.time() - t, 1)


if __name__ == "__main__":
    blob = open("/tmp/blob", "rb")
    jobs = []
    for name, size, sha in PARTS:
        d = Path(f"/tmp/gguf/{name}"); d.mkdir(parents=True, exist_ok=True)
        path = d / f"{name}.gguf"
        h = hashlib.sha256(); left = size
        with open(path, "wb") as f:
            while left:
                b = blob.read(min(left, 1 << 24)); f.write(b); h.update(b); left -= len(b)
        assert h.hexdigest() == sha, (name, h.hexdigest())
        print(name, "sha ok", flush=True)
        jobs.append((name, str(path), sha))
    with ProcessPoolExecutor(3) as ex:
        for name, secs in ex.map(convert, jobs):
            print("converted", name, secs, "s", flush=True)
