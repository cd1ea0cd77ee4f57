"""Wall time of the approximation-quality sweeps (Fig. 3) that `frog approx` runs.

- n = 64, k = 2^0 .. 2^10, 1000 samples, all methods: median of --repeats runs, against the
  0.5 s target;
- n = 2^0 .. 2^10 with the same k and samples: one run (about 100 s on 2 cores; --skip-large).

Both call frog.experiments.approximation.sweep, the library call behind `frog approx`, without a
CSV. Prints the times and a final JSON line.

    python benchmarks/approx.py [--repeats 3] [--samples 1000] [--skip-large] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _common import print_result

from frog.experiments.approximation import sweep

TARGET_SECONDS = 0.5
POWERS = [2**i for i in range(11)]  # 1 .. 1024


def run_sweep(dims: list[int], samples: int) -> tuple[float, int]:
    """Seconds for one full sweep and the number of result rows it gave."""
    start = time.perf_counter()
    rows = list(sweep(dims, POWERS, samples, progress=False))
    return time.perf_counter() - start, len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--skip-large", action="store_true", help="skip the n = 2^0 .. 2^10 sweep")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    runs = [run_sweep([64], args.samples) for _ in range(args.repeats)]
    small = statistics.median(seconds for seconds, _ in runs)
    print(f"approximation sweeps, k = 1 .. 1024, {args.samples} samples, all methods, "
          f"threads {torch.get_num_threads()}")
    print(f"{'sweep':<18}{'rows':>6}{'seconds':>10}{'x target':>10}")
    print(f"{'n = 64':<18}{runs[0][1]:>6}{small:>10.2f}{small / TARGET_SECONDS:>10.2f}"
          f"   (runs: {', '.join(f'{s:.2f}' for s, _ in runs)}; target {TARGET_SECONDS} s)")
    result = {"samples": args.samples, "n64_seconds": round(small, 3),
              "n64_runs": [round(s, 3) for s, _ in runs], "n64_over_target": round(small / TARGET_SECONDS, 2)}
    if not args.skip_large:
        large, rows = run_sweep(POWERS, args.samples)
        print(f"{'n = 1 .. 1024':<18}{rows:>6}{large:>10.1f}{'':>10}   (one run)")
        result["all_n_seconds"] = round(large, 1)
    print_result("approx", **result)


if __name__ == "__main__":
    main()
