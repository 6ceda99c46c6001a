"""``python -m dq_kit.demo``: the whole flow on the shipped demo model."""

from .pipeline import main

main()
