"""Unit tests for proxy.config: every mistake gets one exact, clear line."""

from __future__ import annotations

import os
import re
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # the package is not installed into the venv; import it from the tree
    sys.path.insert(0, str(ROOT))

from proxy.config.load import (
    BackendConfig, Config, ConfigError, RuleConfig, UserConfig, check_config_main, load_config,
    parse_config, write_config,
)
from proxy.config.emit import toml_value
from proxy.config.schema import spec_fields

EXAMPLE = ROOT / "config" / "rwproxy.toml"
DOCS = ROOT / "docs" / "configuration.md"

MINIMAL = """
[[backends]]
host = "127.0.0.1"
port = 23306

[[users]]
name = "app"
password = "app"
"""


def errors_of(text: str, source: str = "config.toml") -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, source)
    assert str(info.value) == "\n".join(info.value.errors)
    return info.value.errors


def one_error(text: str) -> str:
    errs = errors_of(text)
    assert len(errs) == 1, errs
    return errs[0]


# -- the happy path -------------------------------------------------------------

def test_example_file_loads():
    cfg = load_config(str(EXAMPLE))
    assert cfg.source == str(EXAMPLE)
    assert [(b.name, b.host, b.port) for b in cfg.backends] == [
        ("primary", "127.0.0.1", 23306), ("replica1", "127.0.0.1", 23307), ("replica2", "127.0.0.1", 23308)]
    assert cfg.user("app").password == "app"
    assert cfg.monitor_credentials() == ("rwproxy", "rwproxy")
    assert (cfg.proxy.host, cfg.proxy.port) == ("127.0.0.1", 6033)
    assert cfg.routing.rules[0].regex.search("select * from t FOR update")
    assert cfg.routing.rules[1].applies_to("app") and not cfg.routing.rules[1].applies_to("bob")


def test_defaults():
    cfg = parse_config(MINIMAL)
    assert cfg.proxy.listen == "127.0.0.1:6033" and cfg.proxy.port == 6033
    assert cfg.proxy.workers == 0 and cfg.proxy.max_connections == 10000
    assert cfg.proxy.auth_plugin == "mysql_native_password"
    assert cfg.proxy.tls.cert == "" and not cfg.proxy.tls.enabled
    b = cfg.backends[0]
    assert (b.name, b.weight, b.role, b.priority, b.no_promotion, b.max_connections) == (
        "127.0.0.1:23306", 1, "auto", 0, False, 0)
    u = cfg.users[0]
    assert (u.auth_plugin, u.default_route, u.read_your_writes, u.require_tls) == ("", "auto", "", False)
    assert cfg.routing.max_replica_lag == 1.0 and cfg.routing.balance == "least-outstanding"
    assert cfg.routing.rules == () and cfg.routing.readonly_functions == ()
    assert cfg.monitor.interval == 0.1 and cfg.monitor.heartbeat_schema == "rwproxy"
    assert cfg.cluster.topology == "primary-replica"
    assert cfg.failover.failover_cooldown == 60.0 and cfg.pool.reset_on_release is True
    assert cfg.monitor_credentials() == ("app", "app")  # falls back to the first user
    assert cfg.user("nobody") is None
    assert cfg == parse_config(MINIMAL) and hash(cfg) == hash(parse_config(MINIMAL))


def test_durations_become_floats_and_ipv6_listen():
    cfg = parse_config(MINIMAL + '[proxy]\nlisten = "[::1]:7000"\n[routing]\nmax_replica_lag = 3\n')
    assert cfg.routing.max_replica_lag == 3.0 and type(cfg.routing.max_replica_lag) is float
    assert (cfg.proxy.host, cfg.proxy.port) == ("::1", 7000)


def test_relative_tls_paths_resolve_against_config_dir(tmp_path):
    path = tmp_path / "rw.toml"
    path.write_text(MINIMAL + '[proxy.tls]\ncert = "certs/server.pem"\nkey = "/abs/key.pem"\nca = "certs/ca.pem"\n')
    tls = load_config(str(path)).proxy.tls
    assert tls.cert == str(tmp_path / "certs" / "server.pem") and tls.key == "/abs/key.pem"
    assert tls.ca == str(tmp_path / "certs" / "ca.pem")
    path.write_text(MINIMAL + '[backend_tls]\nmode = "verify_ca"\nca = "tls/ca.pem"\n')
    btls = load_config(str(path)).backend_tls
    assert (btls.mode, btls.ca, btls.cert) == ("verify_ca", str(tmp_path / "tls" / "ca.pem"), "")


# -- each kind of mistake ----------------------------------------------------------

@pytest.mark.parametrize("snippet, message", [
    ('[[backends]]\nhost = "h"\nport = "abc"', 'backends[1].port: expected an integer 1-65535, got "abc"'),
    ('[[backends]]\nhost = "h"\nport = 70000', "backends[1].port: expected an integer 1-65535, got 70000"),
    ('[[backends]]\nhost = "h"\nport = 1\nsocket = "run/mysqld.sock"',
     "backends[1].socket: must be an absolute path to the server's Unix socket (e.g. /run/mysqld/mysqld.sock), "
     'or "" for TCP'),
    ("[proxy]\nworkers = true", "proxy.workers: expected an integer 0-254, got true"),
    ("[proxy]\nworkers = 255", "proxy.workers: expected an integer 0-254, got 255"),
    ("[pool]\nreset_on_release = 1", "pool.reset_on_release: expected a boolean (true or false), got 1"),
    ("[routing]\nmax_replica_lag = 0", "routing.max_replica_lag: expected a number of seconds > 0, got 0"),
    ("[failover]\nfailover_cooldown = -1.5", "failover.failover_cooldown: expected a number of seconds >= 0, got -1.5"),
    ("[routing]\nmax_replica_lag = nan", "routing.max_replica_lag: expected a number of seconds > 0, got nan"),
    ('[proxy]\nlistn = "x"', 'proxy.listn: unknown key; did you mean "listen"?'),
    ("[proxy]\nmax_replica_lag = 2.0", "proxy.max_replica_lag: unknown key; it belongs in [routing]"),
    ("[proxy]\nzzz = 1", "proxy.zzz: unknown key"),
    ('[backend]\nhost = "h"', 'backend: unknown key; did you mean "backends"?'),
    ('[routing]\nbalance = "random"',
     'routing.balance: expected one of "least-outstanding", "round-robin", "lowest-lag", got "random"'),
    ('[cluster]\ntopology = 2', 'cluster.topology: expected one of "primary-replica", "master-master", got 2'),
    ('[proxy]\ncpu_affinity = "auto"', 'proxy.cpu_affinity: expected one of "none", "spread", got "auto"'),
    ('[proxy]\nscheduling = "fifo"', 'proxy.scheduling: expected one of "normal", "batch", got "fifo"'),
    ('[proxy]\nlisten = "6033"', 'proxy.listen: expected "host:port" (IPv6 as "[::1]:6033"), got "6033"'),
    ('[monitor]\nheartbeat_schema = "rw-proxy"',
     'monitor.heartbeat_schema: expected an identifier ([A-Za-z_][A-Za-z0-9_$]*, at most 64 characters), '
     'got "rw-proxy"'),
    ("[routing]\nreadonly_functions = [1]", "routing.readonly_functions: expected an array of strings, got [1]"),
    ('[[backends]]\nport = 1', "backends[1].host: missing required key"),
    ('[[backends]]\nhost = ""\nport = 1', 'backends[1].host: expected a non-empty string, got ""'),
    ('[[backends]]\nhost = "127.0.0.1"\nport = 23306',
     "backends[1]: duplicate backend 127.0.0.1:23306 (same host:port as backends[0])"),
    ('[[backends]]\nhost = "127.0.0.1"\nport = 6033',  # (the default listen address)
     "backends[1]: 127.0.0.1:6033 is rwproxy's own proxy.listen: it would connect to itself"),
    ('[[backends]]\nhost = "localhost"\nport = 6033',
     "backends[1]: localhost:6033 is rwproxy's own proxy.listen: it would connect to itself"),
    ('[[backends]]\nname = "127.0.0.1:23306"\nhost = "other"\nport = 1',
     'backends[1].name: duplicate backend name "127.0.0.1:23306" (same as backends[0])'),
    ('[[users]]\nname = "app"', 'users[1].name: duplicate user "app" (same as users[0])'),
    ('[proxy.tls]\ncert = "c.pem"', "proxy.tls.key: required when proxy.tls.cert is set"),
    ('[proxy.tls]\nkey = "k.pem"', "proxy.tls.cert: required when proxy.tls.key is set"),
    ("[proxy.tls]\nrequire = true", "proxy.tls.require: true needs proxy.tls.cert and proxy.tls.key"),
    ('[proxy.tls]\nca = "ca.pem"', "proxy.tls.ca: needs proxy.tls.cert and proxy.tls.key"),
    ('[backend_tls]\ncert = "c.pem"', "backend_tls.key: required when backend_tls.cert is set"),
    ('[backend_tls]\nmode = "verify"', 'backend_tls.mode: expected one of "disabled", "preferred", "required", '
                                        '"verify_ca", "verify_identity", got "verify"'),
    ('[[routing.rules]]\nmatch = "(select"\nroute = "replica"',
     'routing.rules[0].match: invalid regular expression "(select": missing ), unterminated subpattern at position 0'),
    ('[[routing.rules]]\nmatch = "^select"\ndigest = "SELECT ?"\nroute = "replica"',
     'routing.rules[0]: give exactly one of "match" or "digest" (got both)'),
    ('[[routing.rules]]\nroute = "replica"', 'routing.rules[0]: give exactly one of "match" or "digest" (got neither)'),
    ('[[routing.rules]]\nmatch = "x"', "routing.rules[0].route: missing required key"),
    ('[[routing.rules]]\nroute = "reject"\nmatch = 1', "routing.rules[0].match: expected a string, got 1"),
    ('[proxy.tls]\ncert = 5\nkey = "k.pem"', "proxy.tls.cert: expected a string, got 5"),
    ('[[routing.rules]]\nmatch = "x"\nroute = "primary"\nerror_code = 1234',
     'routing.rules[0].error_code: only used with route = "reject"'),
    ('[[routing.rules]]\nmatch = "x"\nroute = "reject"\nusers = ["ap"]',
     'routing.rules[0].users[0]: unknown user "ap"; did you mean "app"?'),
    ('[[backends]]\nhost = "h"\nport = 1\nrole = "master"',
     'backends[1].role: "master" needs cluster.topology = "master-master"'),
    ('[monitor]\npassword = "x"',
     "monitor.password: set but monitor.user is empty (the first [[users]] entry would be used)"),
])
def test_mistake_messages(snippet, message):
    assert one_error(MINIMAL + snippet + "\n") == f"config.toml: {message}"


def test_missing_and_empty_required_arrays():
    assert errors_of("") == ["config.toml: backends: at least one [[backends]] entry is required",
                             "config.toml: users: at least one [[users]] entry is required"]
    assert errors_of("backends = []\nusers = []\n") == errors_of("")
    assert one_error('backends = 3\n[[users]]\nname = "a"\n') == (
        "config.toml: backends: expected an array of tables ([[backends]]), got 3")
    assert one_error("proxy = 5\n" + MINIMAL) == "config.toml: proxy: expected a table ([proxy]), got 5"


def test_two_primaries_and_master_master_roles():
    two = MINIMAL.replace("port = 23306", 'port = 23306\nrole = "primary"')
    assert one_error(two + '[[backends]]\nhost = "h"\nport = 1\nrole = "primary"\n') == (
        'config.toml: backends[1].role: only one backend may be "primary" (backends[0] already is)')
    mm = MINIMAL + '[[backends]]\nhost = "h"\nport = 1\nrole = "master"\n[cluster]\ntopology = "master-master"\n'
    assert parse_config(mm).backends[1].role == "master"


def test_user_require_tls_needs_cert(tmp_path):
    text = MINIMAL + "require_tls = true\n"
    assert one_error(text) == "config.toml: users[0].require_tls: true needs proxy.tls.cert and proxy.tls.key"
    cfg = parse_config(text + '[proxy.tls]\ncert = "c"\nkey = "k"\n')
    assert cfg.users[0].require_tls


def test_toml_syntax_error():
    msg = one_error(MINIMAL + "[proxy\n")
    assert re.fullmatch(r"config\.toml: TOML syntax error: .+\(at line \d+, column \d+\)", msg), msg


def test_missing_file():
    with pytest.raises(ConfigError) as info:
        load_config("does/not/exist/config.toml")
    assert info.value.errors == ["does/not/exist/config.toml: cannot read: No such file or directory"]


def test_all_errors_reported_at_once():
    text = """
[proxy]
listn = "0.0.0.0:1"
workers = -1
[[backends]]
host = "a"
port = "abc"
[[backends]]
host = "b"
port = 2
weight = 1001
[[users]]
name = ""
[routing]
balance = "fastest"
"""
    assert errors_of(text) == [
        'config.toml: proxy.listn: unknown key; did you mean "listen"?',
        "config.toml: proxy.workers: expected an integer 0-254, got -1",
        'config.toml: backends[0].port: expected an integer 1-65535, got "abc"',
        "config.toml: backends[1].weight: expected an integer 0-1000, got 1001",
        'config.toml: users[0].name: expected a non-empty string, got ""',
        'config.toml: routing.balance: expected one of "least-outstanding", "round-robin", "lowest-lag", '
        'got "fastest"',
    ]


def test_cross_checks_use_original_indexes_after_bad_entries():
    text = MINIMAL + '[[backends]]\nhost = "x"\nport = "bad"\n[[backends]]\nhost = "127.0.0.1"\nport = 23306\n'
    assert errors_of(text) == [
        'config.toml: backends[1].port: expected an integer 1-65535, got "bad"',
        "config.toml: backends[2]: duplicate backend 127.0.0.1:23306 (same host:port as backends[0])",
    ]


# -- round trip, writing, check_config_main ------------------------------------------

def test_to_toml_round_trip():
    cfg = load_config(str(EXAMPLE))
    again = parse_config(cfg.to_toml())
    assert again == cfg and again.routing.rules == cfg.routing.rules
    odd = Config(
        backends=(BackendConfig(host="::1", port=3307, weight=0, role="replica", priority=-3),),
        users=(UserConfig(name='we"ird\\', password='p\x01\t\n\x7f é "q"'),),
    )
    assert odd.backends[0].name == "[::1]:3307"
    back = parse_config(odd.to_toml())
    assert back == odd and back.users[0].password == odd.users[0].password


def test_write_config(tmp_path):
    cfg = parse_config(MINIMAL)
    path = tmp_path / "rwproxy.toml"
    write_config(cfg, str(path))
    assert load_config(str(path)) == cfg
    assert os.stat(path).st_mode & 0o077 == 0  # holds passwords
    bad = Config(backends=(BackendConfig(host="h", port=1),), users=())
    with pytest.raises(ConfigError, match="at least one"):
        write_config(bad, str(tmp_path / "bad.toml"))
    assert not (tmp_path / "bad.toml").exists()


def test_check_config_main(tmp_path, capsys):
    good = tmp_path / "good.toml"
    good.write_text(MINIMAL + '[proxy]\nlisten = "0.0.0.0:7000"\n')
    good.chmod(0o600)
    assert check_config_main(str(good)) == 0
    out, err = capsys.readouterr()
    assert out == f"OK: {good}: 1 backends, 1 users, listening on 0.0.0.0:7000\n" and err == ""

    bad = tmp_path / "bad.toml"
    bad.write_text(MINIMAL + '[proxy]\nworkers = "x"\nlistn = 1\n')
    assert check_config_main(str(bad)) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [f'{bad}: proxy.listn: unknown key; did you mean "listen"?',
                                f'{bad}: proxy.workers: expected an integer 0-254, got "x"']


# -- the example file and the reference stay in step with the schema ------------------

def _sections(cls=Config, prefix=""):
    for f in spec_fields(cls):
        if f.metadata["kind"] in ("table", "tables"):
            path = prefix + f.name
            header = f"[{path}]" if f.metadata["kind"] == "table" else f"[[{path}]]"
            yield header, f.metadata["cls"]
            yield from _sections(f.metadata["cls"], path + ".")


def test_docs_match_schema():
    chunks = {m[1]: m[2] for m in re.finditer(r"^## `(\[.+?\])`\n(.*?)(?=^## |\Z)", DOCS.read_text(), re.M | re.S)}
    for header, cls in _sections():
        rows = re.findall(r"^\| `(\w+)` \| [^|]+ \| (required|`[^`]*`) \|", chunks[header], re.M)
        documented = dict(rows)
        keys = [f for f in spec_fields(cls) if f.metadata["kind"] not in ("table", "tables")]
        assert list(documented) == [f.name for f in keys], header
        for f in keys:
            want = "required" if f.metadata["required"] else f"`{toml_value(f.default)}`"
            assert documented[f.name] == want, (header, f.name)


def test_example_shows_every_key():
    text = EXAMPLE.read_text()
    for header, cls in _sections():
        nodes = [tomllib.loads(text)]
        for part in header.strip("[]").split("."):
            # a table the example only shows commented out ([[admin.users]]) has no node
            nodes = [x for n in nodes for x in (n[part] if isinstance(n.get(part), list) else [n[part]] if part in n else [])]
        shown = {key for n in nodes for key in n}
        for f in spec_fields(cls):
            if f.metadata["kind"] not in ("table", "tables") and f.name not in shown:
                assert re.search(rf"^# {f.name} = ", text, re.M), (header, f.name)  # a commented-out example


def test_rule_regex_is_case_insensitive():
    rule = RuleConfig(match=r"^\s*select\b", route="replica")
    assert rule.regex.search("  SELECT 1") and RuleConfig(digest="SELECT ?").regex is None


def test_admin_port_needs_a_user_with_a_password():
    """No default password: an [admin] section without [[admin.users]] is refused, not opened."""
    with pytest.raises(ConfigError) as e:
        parse_config(MINIMAL + "[admin]\nlisten = '127.0.0.1:7032'\n", "x.toml")
    assert "x.toml: admin.users: the admin port needs at least one" in str(e.value)
    with pytest.raises(ConfigError, match="unknown key"):
        parse_config(MINIMAL + "[admin]\nenabled = true\n", "x.toml")




@pytest.mark.parametrize("snippet, message", [
    ("[stats]\nevents = 2147483648", "stats.events: expected an integer 10-2147483647, got 2147483648"),
    ("[proxy]\nmax_connections = 99999999999999999999999",
     "proxy.max_connections: expected an integer 1-2147483647, got 99999999999999999999999"),
    ("[proxy]\nclient_idle_timeout = 31536001",
     "proxy.client_idle_timeout: expected a number of seconds >= 0 and at most 31536000, got 31536001"),
    ("[monitor]\ninterval = 1e300", "monitor.interval: expected a number of seconds > 0 and at most 31536000, got 1e+300"),
    ("[admin]\nmax_rows = 10000001", "admin.max_rows: expected an integer 1-10000000, got 10000001"),
    ("[failover]\nreplica_heartbeat_period = 4294968",
     "failover.replica_heartbeat_period: expected a number of seconds >= 0 and at most 4294967, got 4294968"),
])
def test_values_past_what_the_runtime_takes_are_refused(snippet, message):
    """TOML integers have no limit: a value that passed the check used to stop `serve` with an
    OverflowError where it reached C (test_hardening runs the largest accepted ones)."""
    assert one_error(MINIMAL + snippet + "\n") == f"config.toml: {message}"


@pytest.mark.parametrize("name, message", [
    ('a\\u0000p', 'users[0].name: a user name with control characters can never log in, got "a\\u0000p"'),
    ("u" * 129, "users[0].name: at most 128 characters (a server's limit for user names), got 129"),
])
def test_user_names_no_client_could_log_in_with_are_refused(name, message):
    text = MINIMAL.replace('name = "app"', f'name = "{name}"', 1)
    assert text != MINIMAL
    assert one_error(text) == f"config.toml: {message}"


def test_a_backend_on_rwproxys_own_address_is_refused_unless_reached_by_socket():
    """rwproxy's monitor and sessions would log in to rwproxy itself (seen by hand: `Access
    denied for user 'rwproxy'` from its own listener, the real server looking down)."""
    on_me = '[[backends]]\nhost = "127.0.0.1"\nport = 6044\n'
    text = '[proxy]\nlisten = "0.0.0.0:6044"\n' + MINIMAL + on_me
    assert errors_of(text) == ["config.toml: backends[1]: 127.0.0.1:6044 is rwproxy's own proxy.listen: it would "
                               "connect to itself"]
    parse_config(MINIMAL + on_me, "config.toml")  # another port than this proxy's: fine
    parse_config('[proxy]\nlisten = "127.0.0.1:6044"\n' + MINIMAL + on_me + 'socket = "/run/mysqld/x.sock"\n',
                 "config.toml")  # reached by its Unix socket: fine


@pytest.mark.parametrize("snippet, message", [
    ('repository = "s3://"', 'backup.repository: expected "file:///ABSOLUTE/PATH", "/ABSOLUTE/PATH" or '
                             '"s3://BUCKET/PREFIX", got "s3://"'),
    ('repository = "s3://Not_A_Bucket/x"', 'backup.repository: expected "file:///ABSOLUTE/PATH", "/ABSOLUTE/PATH" or '
                                           '"s3://BUCKET/PREFIX", got "s3://Not_A_Bucket/x"'),
    ('s3_endpoint = "minio:9000"', 'backup.s3_endpoint: expected the S3 API URL, http://host:port or https://host '
                                   '(or "" for AWS), got "minio:9000"'),
    ('recipients = ["age1short"]', 'backup.recipients: [0] is not an age public key (age1 and 58 more characters, '
                                   'as `rwproxy backup keygen` prints it), got "age1short"'),
])
def test_backup_values_that_would_fail_at_the_first_backup_fail_the_check(snippet, message):
    """(They passed check-config and failed hours later, when the first scheduled backup ran.)"""
    assert one_error(MINIMAL + "[backup]\n" + snippet + "\n") == f"config.toml: {message}"


def test_good_backup_locations_and_keys_pass():
    good = ('[backup]\nrepository = "s3://my.backups-01/cluster/a"\ns3_endpoint = "https://minio.example:9000"\n'
            'recipients = ["age18jt7e45ym5hhfzu9t2gk24urfsjqc34x8pdfl3907t8swwe43pcsshqzzv"]\n')
    cfg = parse_config(MINIMAL + good, "config.toml")
    assert cfg.backup.repository == "s3://my.backups-01/cluster/a" and len(cfg.backup.recipients) == 1


def test_a_config_with_passwords_readable_by_others_gets_a_warning(tmp_path, capsys):
    path = tmp_path / "rw.toml"
    path.write_text(MINIMAL)  # (its [[users]] entry has a password)
    path.chmod(0o644)
    assert check_config_main(str(path)) == 0
    err = capsys.readouterr().err.strip()
    assert err == (f"warning: {path} holds passwords and every local user may read it (mode 0644): chmod 600 it, "
                   "or move the passwords to *_env / *_file keys"), err
    path.chmod(0o600)
    assert check_config_main(str(path)) == 0 and capsys.readouterr().err == ""
    path.write_text(MINIMAL.replace('password = "app"', 'password_env = "APP_PW"'))
    path.chmod(0o644)  # nothing secret in it: no warning
    os.environ["APP_PW"] = "x"
    try:
        assert check_config_main(str(path)) == 0 and capsys.readouterr().err == ""
    finally:
        del os.environ["APP_PW"]


def test_check_config_takes_the_file_as_the_other_commands_do(tmp_path, capsys):
    """`rwproxy check-config --config FILE` (as serve, status and reload take it) was a usage error."""
    from proxy.cli import main

    path = tmp_path / "c.toml"
    path.write_text('[[backends]]\nname = "a"\nhost = "127.0.0.1"\nport = 3306\n[[users]]\nname = "u"\n'
                    'password = "p"\n[monitor]\nuser = "m"\npassword = "m"\n')
    path.chmod(0o600)
    outs = []
    for argv in (["check-config", str(path)], ["check-config", "--config", str(path)], ["check-config", "-c", str(path)]):
        assert main(argv) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0].startswith("OK: ") and outs[0] == outs[1] == outs[2]
    for argv in (["check-config"], ["check-config", str(path), "-c", str(path)]):
        assert main(argv) == 2
        assert "name one config file" in capsys.readouterr().err
