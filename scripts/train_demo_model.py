"""Train the demo VLM shipped inside dq_kit (dq_kit/demo/assets/demo_model) from scratch on 2 CPU cores.

Usage:
    python scripts/train_demo_model.py [--steps 1500] [--out dq_kit/demo/assets/demo_model]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dq_kit.demo.model import train_demo_model

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "dq_kit" / "assets" / "demo_model"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    result = train_demo_model(args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    print(
        f"saved {result.path}: {result.steps} steps in {result.seconds:.0f} s, "
        f"held-out exact match {result.exact_match:.0%}, token F1 {result.token_f1:.2f}"
    )


if __name__ == "__main__":
    main()
