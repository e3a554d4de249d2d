"""The module-level API beside the default node: clustorage.functions inside a with block."""

from __future__ import annotations

import array
import pickle
import time
from pathlib import Path

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


def test_the_loaders_node_cannot_change_what_the_loader_keeps() -> None:
    """A buffer that travels out of band loads as a view of its payload: on the loader's own
    node that payload is the loader's, so the view is read-only there."""
    with node_pair() as (loader, member):
        member.put("k", {"a": pickle.PickleBuffer(array.array("b", b"x" * (1 << 19)))})
        deadline = time.monotonic() + 30
        while "k" not in list(loader.keys()) and time.monotonic() < deadline:
            time.sleep(0.01)
        held = loader.get("k")["a"]
        assert isinstance(held, memoryview) and held.readonly
        with pytest.raises(TypeError):
            held[0] = 0
        assert bytes(memoryview(member.get("k")["a"])[:3]) == b"xxx"


def test_the_loader_nodes_put_it_stopped_waiting_for_lands_there_too(tmp_path: Path) -> None:
    """The loader's own node gives up on a put (its timeout passed while the loop was busy):
    the put is stored and reaches the members, and the loader's node ends with it too."""
    with node_pair(data=str(tmp_path / "data")) as (loader, member):
        loader.put("k", "v1")
        loader._channel.loop.call_soon_threadsafe(time.sleep, 0.5)  # type: ignore[attr-defined]
        loader.timeout = 0.1
        with pytest.raises(clustorage.LoaderUnavailable):
            loader.put("k", "v2")
        loader.timeout = 5.0
        deadline = time.monotonic() + 10
        while loader.version("k", "value") != 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert loader.get("k") == "v2"
        while member.version("k", "value") != 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert member.get("k") == "v2"
