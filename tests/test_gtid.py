"""GTID positions: the one parser (proxy/cluster/gtid.py) and the comparisons routing, the
monitor, failover and the sandbox make with it."""

from proxy.cluster import gtid
from proxy.routing.router import gtid_covers


def test_parse_keeps_the_newest_of_each_domain():
    assert gtid.parse("0-1-57,1-2-9") == {0: (1, 57), 1: (2, 9)}
    assert gtid.seqs("0-1-57,1-2-9") == {0: 57, 1: 9}
    assert gtid.seqs("") == {} and gtid.seqs(None) == {}
    assert gtid.seqs("0-1-5,\n0-2-7") == {0: 7}  # MariaDB wraps long lists
    assert gtid.seqs("0-1-5,garbage,1-x-2, 2-3-4") == {0: 5, 2: 4}


def test_reached_per_domain():
    assert gtid.reached("0-1-10,1-2-3", "0-1-9,1-2-3")
    assert not gtid.reached("0-1-10", "0-1-9,1-2-3")  # a domain it never saw
    assert gtid.reached("", "")
    assert gtid.reached("0-2-9", "0-1-9")  # the server id does not order transactions
    assert gtid.contains({0: 57, 1: 9}, {0: 57}) and not gtid.contains({0: 56}, {0: 57})


def test_merge_and_ahead():
    assert gtid.merge("0-1-5,1-2-9", "0-3-7", "") == "0-3-7,1-2-9"
    assert gtid.ahead("0-1-10,1-2-4", "0-2-7,1-2-4") == {0: 3}
    assert gtid.ahead("0-1-7", "0-1-7,1-2-3") == {}
    assert gtid.ahead("0-1-1,5-1-2", "") == {0: 1, 5: 2}
    assert gtid.describe_ahead({0: 3, 1: 1}) == "3 transactions in domain 0 and 1 transaction in domain 1"


def test_read_your_writes_coverage():
    assert gtid_covers("0-1-100", "0-1-100")
    assert gtid_covers("0-1-101,1-2-5", "0-1-100")
    assert not gtid_covers("0-1-99", "0-1-100")
    assert not gtid_covers("0-1-500", "1-2-1")
    assert not gtid_covers("", "0-1-1")  # an unknown position covers nothing
