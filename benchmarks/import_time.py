"""Import cost of the public face: ``import dq_kit`` and ``dq-kit --help`` against ``import torch``.

Each command runs in a fresh interpreter, alternating, ``--repeats`` times; the medians are compared
in one run (the ratio is what matters on a busy machine). Writes ``benchmarks/results/import_time.md``.

    python benchmarks/import_time.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
COMMANDS = {
    "import torch": [sys.executable, "-c", "import torch"],
    "import dq_kit": [sys.executable, "-c", "import dq_kit"],
    "import dq_kit; dq.load": [sys.executable, "-c", "import dq_kit as dq; dq.load"],
    "dq-kit --help": [sys.executable, "-m", "dq_kit.cli", "--help"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(args.repeats):
        for name, command in COMMANDS.items():
            started = time.perf_counter()
            subprocess.run(command, check=True, capture_output=True)
            times[name].append(time.perf_counter() - started)
    torch_s = statistics.median(times["import torch"])
    lines = [
        "# Import time",
        "",
        f"Median of {args.repeats} fresh interpreters each, alternating (`python benchmarks/import_time.py`).",
        "Targets: `import dq_kit` at most 1.5x `import torch`; `dq-kit --help` under 2 s.",
        "",
        "| command | median s | x import torch |",
        "|---|---|---|",
    ]
    for name, values in times.items():
        median = statistics.median(values)
        lines.append(f"| `{name}` | {median:.2f} | {median / torch_s:.2f} |")
    text = "\n".join(lines) + "\n"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "import_time.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
