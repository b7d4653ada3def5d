def test_query_through_proxy_reaches_primary(proxy, cluster):
    with proxy.connect() as conn, conn.cursor() as cur:
        cur.execute("SELECT @@port, DATABASE()")
        assert cur.fetchone() == (cluster.primary.port, "app")
