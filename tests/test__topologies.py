"""The topologies of tests/_topologies.py really behave as the gateway's failure tests assume: a cluster node's
death is seen by its peers and it comes back with its slots, Sentinel promotes the replica, and the Postgres
standby replicates, lags while replay is paused and survives a restart."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests._topologies import (
    PsqlError,
    RedisReplyError,
    postgres_replica,
    redis_cluster,
    redis_command,
    redis_sentinel,
    wait_until,
)


@pytest.mark.topology
def test_cluster_node_dies_and_rejoins_with_its_slots(tmp_path: Path) -> None:
    with redis_cluster(tmp_path) as cluster:
        assert len(cluster.addresses) == 3
        owner = cluster.node_for_key("gw:topology")
        other = (owner + 1) % 3
        assert cluster.command(owner, "SET", "gw:topology", "v") == "OK"
        with pytest.raises(RedisReplyError, match=f"MOVED .*:{cluster.ports[owner]}"):
            cluster.command(other, "GET", "gw:topology")
        # A key the surviving node serves itself, to show it keeps serving while its peer is down.
        own_key = next(k for k in (f"gw:{n}" for n in range(1000)) if cluster.node_for_key(k) == other)

        cluster.kill(owner)
        wait_until(
            "the peers flag the dead node fail and its slots failed",
            lambda: (
                "fail" in cluster.node_flags(owner, other)
                and int(cluster.cluster_info(other)["cluster_slots_fail"]) > 0
            ),
            10,
        )
        assert cluster.command(other, "SET", own_key, "still served") == "OK"

        cluster.restart(owner)
        assert cluster.cluster_info(other)["cluster_slots_ok"] == "16384"
        assert cluster.node_for_key("gw:topology") == owner
        assert cluster.command(owner, "GET", "gw:topology") is None  # back with its slots, empty: nothing persisted
        assert cluster.command(owner, "SET", "gw:topology", "again") == "OK"


@pytest.mark.topology
def test_sentinel_promotes_the_replica_when_the_master_dies(tmp_path: Path) -> None:
    with redis_sentinel(tmp_path) as sentinel:
        assert len(sentinel.sentinel_addresses) == 3
        assert sentinel.current_master() == ("127.0.0.1", sentinel.master_port)
        assert sentinel.command(sentinel.master_port, "SET", "before", "1") == "OK"
        wait_until("the write replicated", lambda: redis_command(sentinel.replica_port, "GET", "before") == "1", 5)

        old = sentinel.kill_master()
        assert old == sentinel.master_port
        new = sentinel.wait_promoted(old, timeout_s=10)
        assert new == ("127.0.0.1", sentinel.replica_port)
        assert sentinel.current_master() == new
        assert sentinel.command(new[1], "SET", "after", "2") == "OK"
        assert sentinel.command(new[1], "GET", "before") == "1"
        # Not restarted here: an old master without persistence that comes back at once, empty, can be taken
        # for the master again before the sentinels have spread the failover, and the promoted replica then
        # syncs from it and loses its data (seen once in a full run). Redis's docs warn against exactly that:
        # https://redis.io/docs/latest/operate/oss_and_stack/management/replication/ ("Safety of replication
        # when master has persistence turned off").


@pytest.mark.topology
def test_postgres_standby_replicates_lags_while_paused_and_restarts(tmp_path: Path) -> None:
    with postgres_replica(tmp_path) as pg:
        assert pg.primary_url != pg.replica_url
        assert pg.replica_sql("SELECT pg_is_in_recovery()") == "t"
        pg.primary_sql("CREATE TABLE topology_check (id int PRIMARY KEY)")
        pg.wait_caught_up()
        assert pg.replica_sql("SELECT to_regclass('topology_check') IS NOT NULL") == "t"
        with pytest.raises(PsqlError, match="read-only transaction"):
            pg.replica_sql("INSERT INTO topology_check VALUES (0)")

        pg.pause_replay()
        pg.primary_sql("INSERT INTO topology_check VALUES (1)")
        pg.wait_received()  # the standby has the row's WAL...
        assert pg.replica_sql("SELECT count(*) FROM topology_check") == "0"  # ...and does not show it
        with pytest.raises(TimeoutError):
            pg.wait_caught_up(timeout_s=0.5)
        pg.resume_replay()
        pg.wait_caught_up()
        assert pg.replica_sql("SELECT count(*) FROM topology_check") == "1"

        pg.stop_replica()
        pg.primary_sql("INSERT INTO topology_check VALUES (2)")  # kept for the standby in its slot
        pg.start_replica()
        pg.wait_caught_up()
        assert pg.replica_sql("SELECT array_agg(id ORDER BY id) FROM topology_check") == "{1,2}"
