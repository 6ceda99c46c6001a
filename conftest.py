"""Collection rules shared by the test-suite and the docstring examples (``--doctest-modules``)."""

from __future__ import annotations

import doctest

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Docstring examples that only illustrate (a hub model, a GPU, a long training run) mark every
    line ``+SKIP``: they are documentation, so they are deselected rather than reported as skipped tests."""
    illustrations = [
        item
        for item in items
        if isinstance(item, pytest.DoctestItem) and all(example.options.get(doctest.SKIP) for example in item.dtest.examples)
    ]
    if illustrations:
        config.hook.pytest_deselected(items=illustrations)
        items[:] = [item for item in items if item not in illustrations]
