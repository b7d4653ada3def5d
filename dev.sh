#!/usr/bin/env bash
# The README's commands. Installs what is missing, then:
#   ./dev.sh demo   start a sandbox MariaDB cluster and rwproxy in front of it
#   ./dev.sh test   run the test suite against real MariaDB servers it starts itself
#   ./dev.sh bench  run the benchmarks (sysbench, direct vs through rwproxy)
#   ./dev.sh setup  only install
set -euo pipefail
cd "$(dirname "$0")"

PY=${RWPROXY_PYTHON:-python3}
VENV=${RWPROXY_VENV:-.venv}
APT_PACKAGES="mariadb-server mariadb-client mariadb-backup sysbench python3-venv pkg-config libmariadb-dev gcc python3-dev haproxy prometheus curl etcd-server etcd-client openssl"

say() { echo "dev.sh: $*" >&2; }

system_deps() {
    local missing=()
    command -v mariadbd >/dev/null 2>&1 || [ -x /usr/sbin/mariadbd ] || missing+=(mariadb-server)
    command -v mariadb >/dev/null 2>&1 || missing+=(mariadb-client)
    # rwproxy backup: physical backups and restores (mariadb-backup, mbstream)
    command -v mariadb-backup >/dev/null 2>&1 || missing+=(mariadb-backup)
    command -v sysbench >/dev/null 2>&1 || missing+=(sysbench)
    command -v pkg-config >/dev/null 2>&1 || missing+=(pkg-config)
    pkg-config --exists libmariadb 2>/dev/null || missing+=(libmariadb-dev)
    command -v gcc >/dev/null 2>&1 || missing+=(gcc)
    "$PY" -c 'import venv, ensurepip' >/dev/null 2>&1 || missing+=(python3-venv)
    # the operator tests run a real HAProxy in front of rwproxy and a real Prometheus scraping it
    command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || missing+=(haproxy)
    { command -v prometheus && command -v promtool; } >/dev/null 2>&1 || missing+=(prometheus)
    command -v curl >/dev/null 2>&1 || missing+=(curl)
    # a test reads the certificate chain rwproxy's TLS sends (openssl s_client -starttls mysql)
    command -v openssl >/dev/null 2>&1 || missing+=(openssl)
    # several coordinated instances ([cluster] coordination = "etcd"): tests start a real etcd cluster
    command -v etcd >/dev/null 2>&1 || missing+=(etcd-server)
    command -v etcdctl >/dev/null 2>&1 || missing+=(etcd-client)
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        say "installing Debian packages: ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    else
        say "missing system packages: ${missing[*]}; install them with: sudo apt-get install ${missing[*]}"
        exit 1
    fi
}

python_env() {
    if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        say "rwproxy needs Python 3.11 or newer; $PY is $("$PY" --version 2>&1). Set RWPROXY_PYTHON to a newer python."
        exit 1
    fi
    if [ ! -x "$VENV/bin/python" ]; then
        say "creating virtualenv $VENV"
        "$PY" -m venv "$VENV"
    fi
    local stamp="$VENV/.rwproxy-installed"
    if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ setup.py -nt "$stamp" ] || [ -n "$(find proxy -name '*.c' -newer "$stamp")" ]; then
        say "installing rwproxy and its Python dependencies into $VENV"
        "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
        "$VENV/bin/python" -m pip install -q -e ".[test,fast,bench]"
        touch "$stamp"
    fi
}

cmd=${1:-help}
[ $# -gt 0 ] && shift
case "$cmd" in
    setup) system_deps; python_env ;;
    demo) system_deps; python_env; exec "$VENV/bin/rwproxy" demo "$@" ;;
    test)
        system_deps; python_env
        RWPROXY_REQUIRE_C=${RWPROXY_REQUIRE_C:-1} exec "$VENV/bin/python" -m pytest tests "$@" ;;
    bench) system_deps; python_env; exec "$VENV/bin/python" -m benchmarks.run "$@" ;;
    *) sed -n '2,7p' "$0"; exit 2 ;;
esac
