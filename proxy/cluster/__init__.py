"""The cluster as rwproxy knows it and acts on it: topology (the one picture the monitor writes
and the workers read), monitor/ (checks, lag), failover/ (failover, switchover, fencing,
rejoin), gtid (positions), sqlerrors (PyMySQL errors read the same way everywhere).
"""
