"""Do the property tests hold on many more (random) examples than CI runs? The long hypothesis profile, in
parallel shards with different seeds, with a summary of examples run and failures per test.

Each shard is one `pytest tests/test_properties.py` process with ASAM_HYPOTHESIS_PROFILE=long, its own
ASAM_HYPOTHESIS_SEED (base seed + shard number) and one torch thread. `--examples` is the profile's
max_examples summed over shards (each test runs its share of it: half for the two main tests, see budget() in
tests/test_properties.py). With `--minutes`, every shard starts new rounds (new seeds) until the time is up.

    python benchmarks/tools/hypothesis_long.py                         # 1 shard: 5000 examples per main test
    python benchmarks/tools/hypothesis_long.py --shards 16             # the same 5000, spread over 16 cores
    python benchmarks/tools/hypothesis_long.py --shards 16 --minutes 30   # 16 cores, new seeds until 30 min are up
    python benchmarks/tools/hypothesis_long.py --examples 4000 --minutes 55 --nice 10   # what ran on a 2-core CPU

Exit status 1 if any example failed; each shard's full pytest output is kept in --log-dir.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import signal
import subprocess
import tempfile
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository: pytest runs there
STATS = re.compile(r"(\d+) passing, (\d+) failing, and (\d+) invalid")
TEST_LINE = re.compile(r"^(\S+::\S+):\s*$")


@dataclasses.dataclass
class Round:
    shard: int
    seed: int
    returncode: int
    seconds: float
    log: Path
    stats: dict[str, list[int]]  # test -> [passing, failing, invalid]
    falsifying: list[str]


def parse(text: str) -> tuple[dict[str, list[int]], list[str]]:
    """Per-test counts from --hypothesis-show-statistics (summed over phases), and the falsifying examples."""
    stats: dict[str, list[int]] = {}
    current = None
    for line in text.splitlines():
        m = TEST_LINE.match(line.strip())
        if m:
            current = m.group(1).split("::")[-1]
            stats.setdefault(current, [0, 0, 0])
            continue
        m = STATS.search(line)
        if m and current:
            for i in range(3):
                stats[current][i] += int(m.group(i + 1))
    falsifying = [l.strip() for l in text.splitlines() if l.startswith(("Falsifying example", "FAILED"))]
    return stats, falsifying


def start(shard: int, seed: int, examples: int, args: argparse.Namespace, log: Path) -> subprocess.Popen:
    env = dict(os.environ)
    env.update(
        ASAM_HYPOTHESIS_PROFILE="long",
        ASAM_HYPOTHESIS_SEED=str(seed),
        ASAM_HYPOTHESIS_EXAMPLES=str(examples),
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
    )
    cmd = [sys.executable, "-m", "pytest", *args.tests, "-q", "-p", "no:cacheprovider", "-p", "no:logging",
           "--hypothesis-show-statistics", f"--hypothesis-seed={seed}"]
    if args.nice:
        cmd = ["nice", "-n", str(args.nice), *cmd]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=int, default=1, help="parallel pytest processes (one per core)")
    p.add_argument("--examples", type=int, default=10000,
                   help="the long profile's max_examples summed over shards, per round (main tests run half each)")
    p.add_argument("--seed", type=int, default=None, help="base seed (default: from the clock); shard i uses seed+i")
    p.add_argument("--minutes", type=float, default=0.0,
                   help="keep starting rounds with new seeds until this much time has passed (0: one round)")
    p.add_argument("--nice", type=int, default=0, help="run shards under `nice -n`")
    p.add_argument("--log-dir", type=Path, default=Path(tempfile.gettempdir()) / "asam_hypothesis_long")
    p.add_argument("tests", nargs="*", default=["tests/test_properties.py"])
    args = p.parse_args()

    from asam_compile.measure import header_line, run_header  # the shards import torch themselves

    seed = args.seed if args.seed is not None else int(time.time()) % 1_000_000
    per_shard = math.ceil(args.examples / args.shards)
    args.log_dir.mkdir(parents=True, exist_ok=True)
    began = time.time()
    workload = (f"hypothesis long profile: python {sys.version.split()[0]}, {os.cpu_count()} CPUs, {args.shards} "
                f"shard(s), max_examples {per_shard} per shard per round, base seed {seed}"
                + (f", {args.minutes:g} minutes" if args.minutes else ""))
    print("# " + header_line(run_header("cpu", workload=workload)), flush=True)

    rounds: list[Round] = []
    running: dict[int, tuple[subprocess.Popen, int, float, Path]] = {}
    next_seed = seed
    n_started = 0

    def launch(shard: int) -> None:
        nonlocal next_seed, n_started
        log = args.log_dir / f"shard{shard:02d}_seed{next_seed}.log"
        running[shard] = (start(shard, next_seed, per_shard, args, log), next_seed, time.time(), log)
        next_seed += 1
        n_started += 1

    def stop(signum, frame):  # `kill` of the runner stops its shards too
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    interrupted = False
    try:
        for shard in range(args.shards):
            launch(shard)
        while running:
            time.sleep(1.0)
            for shard, (proc, s, t0, log) in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[shard]
                stats, falsifying = parse(log.read_text(errors="replace"))
                r = Round(shard, s, proc.returncode, time.time() - t0, log, stats, falsifying)
                rounds.append(r)
                n = sum(v[0] + v[1] for v in stats.values())
                print(f"shard {shard} seed {s}: rc={r.returncode}, {n} examples, {r.seconds:.0f} s"
                      + (f", FAILED: {falsifying}" if r.returncode else ""), flush=True)
                if args.minutes and time.time() - began < args.minutes * 60:
                    launch(shard)
    except KeyboardInterrupt:
        interrupted = True
        for proc, *_ in running.values():
            proc.terminate()
            proc.wait()
        print("# interrupted: the rounds still running were stopped and are not counted", flush=True)

    wall = time.time() - began
    totals: dict[str, list[int]] = {}
    for r in rounds:
        for test, v in r.stats.items():
            t = totals.setdefault(test, [0, 0, 0])
            for i in range(3):
                t[i] += v[i]
    print(f"\n# {len(rounds)} round(s) in {wall / 60:.1f} min wall")
    print(f"{'test':<60} {'passing':>9} {'failing':>8} {'invalid':>8}")
    for test, (ok, bad, invalid) in sorted(totals.items()):
        print(f"{test:<60} {ok:>9} {bad:>8} {invalid:>8}")
    print(f"{'total':<60} {sum(v[0] for v in totals.values()):>9} {sum(v[1] for v in totals.values()):>8} "
          f"{sum(v[2] for v in totals.values()):>8}")
    failed = [r for r in rounds if r.returncode != 0]
    for r in failed:
        print(f"\nFAILED shard {r.shard} seed {r.seed} (rc={r.returncode}), log {r.log}:")
        for line in r.falsifying:
            print(f"  {line}")
    if not failed:
        print("failures: none")
    return 1 if failed else 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
