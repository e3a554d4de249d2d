"""The module-level API beside the default node: clustorage.functions inside a with block."""

from __future__ import annotations

import pytest

import clustorage
from tests.conftest import node_pair

pytestmark = pytest.mark.timeout(60)


def test_functions_reads_the_node_of_a_with_block() -> None:
    """Inside 'with clustorage.Node(...)', clustorage.functions.NAME is that node's function."""
    assert clustorage.default_node() is None
    with node_pair() as (_loader, member):
        member.define("triple", "lambda x: 3 * x")
        assert clustorage.functions.triple(4) == 12
        assert "triple" in dir(clustorage.functions)
        with pytest.raises(AttributeError, match="no function 'missing' is loaded on m"):
            clustorage.functions.missing  # noqa: B018
    with pytest.raises(RuntimeError, match=r"with clustorage\.Node"):
        clustorage.functions.triple  # noqa: B018
    assert dir(clustorage.functions) == []


def test_functions_prefers_the_default_node() -> None:
    """With a default node started, clustorage.functions reads it, not a with block's node."""
    solo = clustorage.start("solo", listen="127.0.0.1:0", data=":memory:", cookie="solo")
    try:
        solo.define("which", "lambda: 'default'")
        with node_pair() as (_loader, member):
            member.define("which", "lambda: 'with block'")
            assert clustorage.functions.which() == "default"
    finally:
        clustorage.stop()
