"""Partition servers read a gzip-compressed lookup table (what the operator publishes as
``binaryData["lookup.json.gz"]`` when the table is large) and reload it like the plain file:
the ConfigMap mounted as a directory may hold only ``lookup.json.gz`` beside the servers'
``--lookup .../lookup.json``."""

from __future__ import annotations

import numpy as np

from partition_server.api.distributor import Distribution
from tests.support.dataplane import TOL, Cluster, batch, build_table, reference, wait_until


def test_servers_reload_a_lookup_published_only_as_lookup_json_gz(tmp_path):
    with Cluster(tmp_path, 3, Distribution("balanced"), poll_seconds=0.1) as cluster:
        x, _ = batch(5)
        expected = reference().forward(x)
        out, _, _ = cluster.driver().step(x)
        np.testing.assert_allclose(out, expected, **TOL)

        # The table grows past the threshold: the key set changes to lookup.json.gz only.
        new = build_table(cluster.table.addresses, Distribution("layers", layers=((1,), (0,), (2,))))
        assert new.version != cluster.table.version
        gz = cluster.lookup_path.with_name("lookup.json.gz")
        gz.write_bytes(new.to_gzip())
        cluster.lookup_path.unlink()
        driver = cluster.driver(new)
        wait_until(lambda: all(r.lookup_version == new.version for r in driver.status()),
                   what="every server to load the lookup from lookup.json.gz")
        out, _, _ = driver.step(x)
        np.testing.assert_allclose(out, expected, **TOL)

        # And back to the plain key: the plain file, when present, is the one read.
        back = build_table(cluster.table.addresses, Distribution("count", counts=(5, 9, 10)))
        cluster.write_lookup(back)
        driver = cluster.driver(back)
        wait_until(lambda: all(r.lookup_version == back.version for r in driver.status()),
                   what="every server to load the plain lookup.json again")
        out, _, _ = driver.step(x)
        np.testing.assert_allclose(out, expected, **TOL)
