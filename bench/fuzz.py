"""The long fuzzing run: every LAN parser through 10^6 hypothesis examples (issue 7, point 8).

    python -m bench.fuzz [--examples N] [--parser NAME ...] [--batch 10000]

The targets, strategies and properties are the ones CI runs 10,000 times each
(tests/fuzz_targets.py, tests/unit/test_fuzz.py): no exception but the parser's own
error type escapes, a parsed value can be used and re-encoded, nothing allocates past
`memory_bound(len(input))`. Here nothing stops at the first failure: every example runs,
failures are counted and the first few printed with their input.

Examples run in batches of `--batch` (each one a fresh hypothesis run, generation phase
only, no example database): hypothesis keeps a tree of every choice sequence it tried,
and one run of 10^6 examples would hold all of them. Every parse runs under tracemalloc
(started and stopped around the call, so the peak is the parser's alone); "peak traced"
is the largest over all examples and the adversarial inputs of the target (inputs that
claim gigabytes). Wall time includes generating the examples, which costs more than
most parses.

Measured 2026-11-30 on the 2-core development VM shared with other engineers (load
average 4-6 throughout, so rates are about half an idle box's), `--examples 20000`:

| parser    |   examples |   wall s | examples/s | failures |  peak traced |
|-----------|------------|----------|------------|----------|--------------|
| dhcp      |     20,000 |     83.8 |        239 |        0 |       35 KiB |
| tftp      |     20,000 |     95.8 |        209 |        0 |      511 KiB |
| hello     |     20,000 |    155.6 |        129 |        0 |      114 KiB |
| have      |     20,000 |     40.2 |        497 |        0 |       57 KiB |
| catalog   |     20,000 |     61.0 |        328 |        0 |      155 KiB |
| manifest  |     20,000 |    107.5 |        186 |        0 |      113 KiB |
| plan      |     20,000 |     33.6 |        595 |        0 |      111 KiB |
| progress  |     20,000 |     25.8 |        774 |        0 |       45 KiB |
| range     |     20,000 |     25.8 |        775 |        0 |       59 KiB |

TFTP's peak is a request of 2,000 options (29 KB, bound 2.9 MB). Bugs the fuzzer found
before this table (all fixed, each with a regression test in tests/unit/test_fuzz.py):
a 4,400-digit `PXEClient:Arch:` in DHCP option 60 raised ValueError; Plan.parse split
lines at \x1e, \x85 and \u2028 where the agent does not, and let int('') escape for an
empty disk size.
"""

from __future__ import annotations

import argparse
import sys
import time
import tracemalloc
from dataclasses import dataclass, field

from hypothesis import HealthCheck, Phase, given, settings

from tests.fuzz_targets import TARGETS, NotBuilt, Parser, Target, check, memory_bound

MAX_REPORTED = 3


@dataclass
class Result:
    name: str
    examples: int = 0
    wall: float = 0.0
    failures: int = 0
    over_bound: int = 0
    peak: int = 0
    skipped: str = ""
    first_failures: list[str] = field(default_factory=list)

    def row(self) -> str:
        if self.skipped:
            return f"| {self.name:<9} | {'-':>10} | {'-':>8} | {'-':>10} | {'-':>8} | {'-':>11} |"
        rate = self.examples / self.wall if self.wall else 0.0
        failures = f"{self.failures}" + (f" ({self.over_bound} mem)" if self.over_bound else "")
        return (
            f"| {self.name:<9} | {self.examples:>10,} | {self.wall:>8.1f} | {rate:>10,.0f} | "
            f"{failures:>8} | {self.peak / 1024:>8,.0f} KiB |"
        )


def run_one(parser: Parser, data: bytes, result: Result) -> None:
    """One example: the properties, with the parse's peak allocation traced."""
    tracemalloc.start()
    failure = None
    try:
        try:
            check(parser, data)
        except Exception as exc:  # counted and reported, never raised into hypothesis
            failure = f"{type(exc).__name__}: {str(exc)[:160]}"
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    result.peak = max(result.peak, peak)
    if failure is None and peak > memory_bound(len(data)):
        result.over_bound += 1
        failure = f"peak {peak} bytes over the bound {memory_bound(len(data))}"
    if failure is not None:
        result.failures += 1
        if len(result.first_failures) < MAX_REPORTED:
            result.first_failures.append(f"{failure}\n      input: {data[:300]!r}")
    result.examples += 1


def fuzz(target: Target, examples: int, batch: int) -> Result:
    result = Result(target.name)
    try:
        parser = target.parser()
    except NotBuilt as exc:
        result.skipped = str(exc)
        return result
    for data in target.adversarial():
        check_warm(parser, data)
    started = time.perf_counter()
    for data in target.adversarial():
        run_one(parser, data, result)
    while result.examples < examples:
        size = min(batch, examples - result.examples)
        before = result.examples
        strategy = target.strategy()  # fresh valid documents for every batch

        @settings(
            max_examples=size, deadline=None, database=None, phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
        )  # fmt: skip
        @given(strategy)
        def one_batch(data: bytes) -> None:
            run_one(parser, data, result)

        one_batch()
        if result.examples == before:  # the strategy has nothing left to give
            break
    result.wall = time.perf_counter() - started
    return result


def check_warm(parser: Parser, data: bytes) -> None:
    """Compile regexes and fill caches before anything is measured."""
    try:
        check(parser, data)
    except Exception:
        pass  # counted when the same input runs measured


def main(argv: list[str] | None = None) -> int:
    names = [t.name for t in TARGETS]
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--examples", type=int, default=1_000_000, help="per parser")
    ap.add_argument("--parser", action="append", choices=names, help="repeatable; default all")
    ap.add_argument("--batch", type=int, default=10_000, help="examples per hypothesis run")
    args = ap.parse_args(argv)
    chosen = [t for t in TARGETS if args.parser is None or t.name in args.parser]

    print(f"# python -m bench.fuzz --examples {args.examples} (started {time.ctime()})")
    header = (
        f"| {'parser':<9} | {'examples':>10} | {'wall s':>8} | {'examples/s':>10} | "
        f"{'failures':>8} | {'peak traced':>12} |"
    )
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|", flush=True)
    results = []
    for target in chosen:
        result = fuzz(target, args.examples, args.batch)
        results.append(result)
        print(result.row(), flush=True)
    for result in results:
        if result.skipped:
            print(f"\n{result.name}: skipped, {result.skipped}")
        for failure in result.first_failures:
            print(f"\n{result.name}: {failure}")
    print(f"\n# finished {time.ctime()}")
    return 1 if any(r.failures for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
