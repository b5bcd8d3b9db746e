"""Mutation check: do the tests notice when a line of the attention code is wrong? (Not part of CI: minutes per mutant.)

Each mutant replaces one exact source snippet of the DHSA selection or the executor (utils/methods/dhsa/scores.py,
utils/methods/dhsa/select.py, utils/methods/dhsa/__init__.py, utils/attention.py, utils/selection.py; found by its text, not by line number,
since these files change) with a plausible mistake, in a temporary copy of the repository, and runs the tests that
should catch it (stopping at the first failure), after checking that the unmutated code passes them. A mutant is
KILLED when a test fails and SURVIVES when all pass; a surviving mutant points at behaviour no test checks. Every
snippet must occur exactly once in its file: if one does not (the code moved or changed), the script stops with an
error before any test runs; update that mutant's path or snippet.

    python scripts/mutation_check.py                 # every mutant
    python scripts/mutation_check.py --list          # names and snippets
    python scripts/mutation_check.py --only causal_visible forced_local_cap
    python scripts/mutation_check.py --only decode_tail --no-baseline   # one mutant, tests known to pass
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TESTS = ["tests/test_forced_keys.py", "tests/test_decode.py", "tests/test_dhsa.py", "tests/test_baselines.py",
         "tests/test_patch.py", "tests/test_sparse_vs_dense.py", "tests/test_token_rescore.py"]


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str       # file inside the repository
    old: str        # exact snippet, found once in the file
    new: str        # what it becomes
    why: str        # the mistake it stands for


MUTANTS = [
    # utils/methods/dhsa/scores.py and utils/methods/dhsa/select.py
    Mutant("forced_local_cap", "utils/methods/dhsa/scores.py",
           "local = torch.clamp(budget_per_tile // 2, max=local_tokens)",
           "local = torch.clamp(budget_per_tile, max=local_tokens)",
           "forced local keys no longer capped at half the budget"),
    Mutant("forced_sink_cap", "utils/methods/dhsa/scores.py",
           "sink = torch.clamp((budget_per_tile - local) // 2, max=sink_tokens)",
           "sink = torch.clamp(budget_per_tile - local, max=sink_tokens)",
           "forced sink keys may take the whole rest of the budget"),
    Mutant("causal_visible", "utils/methods/dhsa/select.py",
           "visible = key_pos[None, :] < end",
           "visible = key_pos[None, :] <= end",
           "a tile may select the first key after its last query (causal condition of the selection)"),
    Mutant("invisible_slots_listed", "utils/methods/dhsa/select.py",
           'idx = torch.where(top == float("-inf"), Lk, idx)',
           "idx = idx",
           "keys a tile cannot see fill its unused slots"),
    Mutant("robust_weight_swapped", "utils/methods/dhsa/scores.py",
           "weight = lengths.rsqrt() if robust else lengths.reciprocal()",
           "weight = lengths.reciprocal() if robust else lengths.rsqrt()",
           "eq. 4 weights swapped (mean instead of sqrt(len)/len * sum)"),
    Mutant("chunk_lengths", "utils/methods/dhsa/scores.py",
           "lengths = (positions[1:] - positions[:-1]).to(torch.float32)",
           "lengths = positions[1:].to(torch.float32)",
           "chunk length taken as its end position"),
    Mutant("centring_sign", "utils/methods/dhsa/scores.py",
           "scores.sub_(shift[..., None] * weight[:nc])",
           "scores.add_(shift[..., None] * weight[:nc])",
           "center_keys adds the mean-key term instead of removing it (max pooling)"),
    Mutant("query_max_pooling", "utils/methods/dhsa/scores.py",
           "out[:, t0:t1, :nc] = scores.view(H, t1 - t0, T, nc).amax(2)",
           "out[:, t0:t1, :nc] = scores.view(H, t1 - t0, T, nc).mean(2)",
           'query_pooling="max" averages the tile\'s scores instead'),
    Mutant("sink_keeps_key_zero", "utils/methods/dhsa/scores.py",
           "    if sink_tokens > 0:\n        sink = torch.maximum(sink, torch.clamp(budget_per_tile - local, max=1))\n",
           "",
           "key 0 no longer kept when the budget leaves no room for sinks (a query may read no key)"),
    Mutant("decode_tail", "utils/methods/dhsa/scores.py",
           "        else [num_keys - 1, num_keys]",
           "        else [num_keys]",
           "Algorithm 2: the current token shares the generated tokens' chunk instead of having its own"),
    Mutant("decode_prompt_chunks", "utils/methods/dhsa/scores.py",
           "kept = prompt_ends[prompt_ends <= min(prompt_len, num_keys - 1)]",
           "kept = prompt_ends[prompt_ends < min(prompt_len, num_keys - 1)]",
           "Algorithm 2 drops the prompt's last chunk end"),
    Mutant("exact_tail_tiles", "utils/methods/dhsa/select.py",
           "first_exact = max(0, (Lq - options.exact_tail) // T)",
           "first_exact = max(0, (Lq - options.exact_tail) // T + 1)",
           "exact_tail leaves out the first tile that holds one of the last exact_tail queries"),
    Mutant("rescore_causal", "utils/methods/dhsa/select.py",
           "blocked = (cand[:, None, :, None, :] > query_pos[None, None, :, :, None])",
           "blocked = (cand[:, None, :, None, :] >= query_pos[None, None, :, :, None])",
           "token rescoring: a query does not weigh its own key"),
    Mutant("rescore_forced", "utils/methods/dhsa/select.py",
           "weight = torch.where(torch.isinf(top[:, s0:s1]), top[:, s0:s1], weight)",
           "weight = torch.where(top[:, s0:s1] == float(\"-inf\"), top[:, s0:s1], weight)",
           "token rescoring: sink and local keys compete on their weight instead of staying forced"),
    # utils/methods/dhsa/__init__.py (the decode step of a patched model)
    Mutant("decode_keeps_generated", "utils/methods/dhsa/__init__.py",
           'local_tokens=max(options.local_tokens, Lk - state["prompt_len"])',
           'local_tokens=max(options.local_tokens, Lk - state["prompt_len"] - 1)',
           "a sparse decode step no longer forces the current token (the generated tokens but the newest)"),
    # utils/attention.py and utils/selection.py
    Mutant("executor_causal", "utils/attention.py",
           "mask = k_pos <= q_pos[None, None, :, :, None]",
           "mask = k_pos < q_pos[None, None, :, :, None]",
           "the executor drops each query's own key"),
    Mutant("executor_has_key", "utils/attention.py",
           "has_key = (first_key[..., None] <= q_pos[None, None]).reshape(-1, G * T)",
           "has_key = (first_key[..., None] < q_pos[None, None]).reshape(-1, G * T)",
           "a query whose first selected key is itself gets output 0"),
    Mutant("executor_unused_slots", "utils/attention.py",
           "k_pos = torch.where(valid, tile_idx, Lq + selection.q_offset)[:, :, :, None, :]",
           "k_pos = tile_idx[:, :, :, None, :]",
           "unused (-1) slots are read (as key 0)"),
    Mutant("executor_window", "utils/attention.py",
           "rule = rule & (rule_q - k_pos < selection.window)",
           "rule = rule & (rule_q - k_pos <= selection.window)",
           "sliding windows one key too wide"),
    Mutant("executor_scale", "utils/attention.py",
           "    scale = D ** -0.5 if scale is None else scale\n    Hkv = k.shape[1]",
           "    scale = D ** -0.5\n    Hkv = k.shape[1]",
           "the model's attention scale (e.g. Gemma's query_pre_attn_scalar) ignored"),
    Mutant("softcap", "utils/attention.py",
           "scores = torch.tanh(scores / softcap) * softcap\n        scores = scores.masked_fill(~mask",
           "scores = torch.tanh(scores) * softcap\n        scores = scores.masked_fill(~mask",
           "Gemma-2 logit soft-capping without the division"),
    Mutant("dense_window", "utils/attention.py",
           "mask = mask & (q_pos - k_pos < window)",
           "mask = mask & (q_pos - k_pos <= window)",
           "dense sliding-window attention one key too wide"),
    Mutant("mask_causal", "utils/selection.py",
           "mask &= (k_pos[None, :] <= q_pos[:, None])",
           "mask &= (k_pos[None, :] < q_pos[:, None])",
           "Selection.mask (plots, recall) drops each query's own key"),
]


def copy_repository(target: Path) -> None:
    """Tracked and untracked-but-not-ignored files of the repository, and ../shared (tests' data) as a link."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO,
                           check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, files):
        source = REPO / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    shared = REPO.parent / "shared"
    if shared.is_dir():
        (target.parent / "shared").symlink_to(shared)


def run_tests(copy: Path, tests: list[str], timeout: int) -> tuple[str, str, float]:
    """(status, detail, seconds): KILLED with the first failing test, SURVIVED, or ERROR."""
    start = time.monotonic()
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-rf", "-p", "no:cacheprovider", *tests]
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    try:
        result = subprocess.run(command, cwd=copy, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return "ERROR", f"tests ran over {timeout} s", time.monotonic() - start
    seconds = time.monotonic() - start
    output = result.stdout + result.stderr
    if result.returncode == 0:
        return "SURVIVED", "all tests pass", seconds
    if result.returncode == 1:
        failed = re.findall(r"^FAILED (\S+)", output, flags=re.M)
        return "KILLED", failed[0] if failed else "a test failed", seconds
    last = output.strip().splitlines()[-1] if output.strip() else f"pytest exit code {result.returncode}"
    return "KILLED", f"tests could not run: {last}", seconds  # e.g. an import error: noticed, if loudly


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--only", nargs="+", default=None, help="mutant names to run (default: all)")
    parser.add_argument("--tests", nargs="+", default=TESTS, help="test files run against each mutant")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per mutant")
    parser.add_argument("--list", action="store_true", help="print the mutants and exit")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip the check that the unmutated code passes the tests (when you just ran them)")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTANTS if args.only is None or m.name in args.only]
    unknown = set(args.only or ()) - {m.name for m in MUTANTS}
    if unknown:
        sys.exit(f"error: unknown mutant(s) {sorted(unknown)}; see --list")
    missing = [(m, (REPO / m.path).read_text(encoding="utf-8").count(m.old) if (REPO / m.path).is_file() else None)
               for m in chosen]
    missing = [(m, count) for m, count in missing if count != 1]
    if missing:
        for m, count in missing:
            found = "the file does not exist" if count is None else f"the snippet occurs {count} times (needs 1)"
            print(f"error: mutant {m.name}: {m.path}: {found}:\n    {m.old!r}", file=sys.stderr)
        sys.exit(f"error: {len(missing)} mutant(s) no longer apply; update their path/snippet in {Path(__file__).name}")
    if args.list:
        for m in chosen:
            print(f"{m.name}: {m.path}: {m.why}\n    - {m.old!r}\n    + {m.new!r}")
        return

    results = []
    with tempfile.TemporaryDirectory(prefix="mutation_check_") as tmp:
        copy = Path(tmp) / "repo"
        copy_repository(copy)
        print(f"repository copied to {copy}; tests: {' '.join(args.tests)}", flush=True)
        if not args.no_baseline:  # unmutated, the tests must pass: otherwise every mutant would look killed
            status, detail, seconds = run_tests(copy, args.tests, args.timeout)
            if status != "SURVIVED":
                sys.exit(f"error: the tests fail without any mutant ({detail}); fix them first")
            print(f"{'PASSED':8s} {'(no mutant)':24s} {seconds:6.0f} s  the unmutated code passes", flush=True)
        for m in chosen:
            path = copy / m.path
            original = path.read_text(encoding="utf-8")
            if original.count(m.old) != 1:  # checked in the repository above; the copy must be the same
                sys.exit(f"error: mutant {m.name}: snippet not found once in the copy of {m.path}")
            mutated = original.replace(m.old, m.new)
            try:  # a mutant that does not compile would be "killed" by an import error: a broken mutant, not a test
                compile(mutated, str(path), "exec")
            except SyntaxError as err:
                sys.exit(f"error: mutant {m.name} makes {m.path} invalid Python ({err}); fix its replacement")
            path.write_text(mutated, encoding="utf-8")
            try:
                status, detail, seconds = run_tests(copy, args.tests, args.timeout)
            finally:
                path.write_text(original, encoding="utf-8")
            results.append((m, status, detail, seconds))
            print(f"{status:8s} {m.name:24s} {seconds:6.0f} s  {detail}", flush=True)

    print(f"\n{'mutant':24s} {'status':9s} {'file':20s} why / first failing test")
    for m, status, detail, _ in results:
        print(f"{m.name:24s} {status:9s} {m.path:20s} {m.why}\n{'':55s}{detail}")
    survivors = [m.name for m, status, _, _ in results if status == "SURVIVED"]
    print(f"\n{sum(s == 'KILLED' for _, s, _, _ in results)} killed, {len(survivors)} survived"
          f"{': ' + ', '.join(survivors) if survivors else ''}, "
          f"{sum(s == 'ERROR' for _, s, _, _ in results)} errors")
    sys.exit(1 if survivors or any(s == "ERROR" for _, s, _, _ in results) else 0)


if __name__ == "__main__":
    main()
