"""Connections to the servers: connection.BackendConnection (relay or collect, the grown net
buffer, backend login), pool.Pools (reset before reuse), shared (pipelined connections many
sessions share), tls (TLS policy per backend, also for the control plane's PyMySQL connections).
"""
