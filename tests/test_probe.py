"""clustorage.Probe: a one-shot status client that never joins the cluster."""

from __future__ import annotations

import pytest

import clustorage
from clustorage.messages import Fetch, Put
from tests.conftest import COOKIE, Cluster

pytestmark = pytest.mark.timeout(60)


def test_probe_answers_status_and_history_without_joining(cluster: Cluster) -> None:
    """A probe reads status and history; the loader never lists it among the nodes."""
    cluster.start_loader()
    member = cluster.member("dev")
    member.ok("node.define('f', 'lambda: 1')\nnode.define('f', 'lambda: 2')")
    with clustorage.Probe(cluster.loader, cookie=COOKIE) as probe:
        status = probe.status()
        assert [node["name"] for node in status["nodes"]] == ["app1", "dev"]
        assert (status["keys"], status["functions"]) == (0, 1)
        assert [entry.version for entry in probe.history("f")] == [1, 2]
        assert member.ok("node.nodes()") == ["app1", "dev"]
    assert "probe" not in cluster.loader_log()


def test_a_probes_history_of_a_key_the_loader_refuses_is_answered(cluster: Cluster) -> None:
    """A History for a name that cannot be stored (a lone surrogate) gets the loader's
    refusal at once, not a wait for an answer that never comes; the probe goes on."""
    cluster.start_loader()
    with clustorage.Probe(cluster.loader, cookie=COOKIE, timeout=30) as probe:
        with pytest.raises(ValueError, match="the loader refused the History"):
            probe.history("ab\ud800")
        assert probe.status()["keys"] == 0


@pytest.mark.parametrize("message", [Put(7, "k", b"v"), Fetch(7, "value", "k", True)])
def test_probe_may_not_write_or_take_leases(cluster: Cluster, message: object) -> None:
    """A probe that sends anything but Status or History is closed; nothing is stored."""
    cluster.start_loader()
    closed = pytest.raises(clustorage.LoaderUnavailable, match="closed the connection")
    with clustorage.Probe(cluster.loader, cookie=COOKIE) as probe, closed:
        probe._ask(message, 7)  # type: ignore[arg-type]
    with clustorage.Probe(cluster.loader, cookie=COOKIE) as probe:
        assert probe.status()["keys"] == 0
    assert "a probe sent a" in cluster.loader_log()


def test_probe_refuses_a_wrong_cookie_and_a_wrong_name(cluster: Cluster) -> None:
    """A wrong cookie is an AuthenticationError; a wrong loader name a ConfigError naming it."""
    cluster.start_loader()
    with pytest.raises(clustorage.AuthenticationError, match="refused our cookie"):
        clustorage.Probe(cluster.loader, cookie="not-the-cookie")
    with pytest.raises(clustorage.ConfigError, match="use --loader app1@"):
        clustorage.Probe(f"other@127.0.0.1:{cluster.port}", cookie=COOKIE)
    with pytest.raises(clustorage.ConfigError, match="no loader named"):
        clustorage.Probe(None, cookie=COOKIE, env={})
