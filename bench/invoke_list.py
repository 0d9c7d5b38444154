"""Start-up time of `invoke --list` (target < 0.5 s), median of 10 runs."""

import subprocess
import sys

from common import ROOT, median, timed

RUNS = 10


def main():
    def once():
        subprocess.run(
            [sys.executable, "-m", "invoke", "--list"],
            cwd=ROOT,
            check=True,
            capture_output=True,
        )

    once()  # warm the bytecode cache
    times = [timed(once) for _ in range(RUNS)]
    best, mid = min(times), median(times)
    print(f"invoke --list: median {mid:.3f} s, best {best:.3f} s over {RUNS} runs")
    print(f"target < 0.5 s: ratio {mid / 0.5:.2f} of the budget")


if __name__ == "__main__":
    main()
