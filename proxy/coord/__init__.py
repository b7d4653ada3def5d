"""Several rwproxy instances serving one cluster: leader election, fencing epochs and the shared
decisions, through etcd (docs/coordination.md)."""
