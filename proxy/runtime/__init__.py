"""Processes and the wires between them: supervisor (binds, forks, restarts workers), worker (one
event loop serving sessions), controlplane (monitor, failover, status in the supervisor),
channels (topology snapshots down a pipe to each worker), control (the operator's socket),
stats (counters the workers share), launcher (running `rwproxy serve` as a child).
"""
