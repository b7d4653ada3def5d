"""The pristine datadir every node starts from: mariadb-install-db runs once, nodes get copies."""

from __future__ import annotations

import errno
import getpass
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from proxy.sandbox.util import SandboxError

INSTALL_TIMEOUT = 180
# Same InnoDB sizes as my.cnf, so a node's first start does not have to resize the redo log.
INSTALL_ARGS = ["--auth-root-authentication-method=normal", "--skip-test-db",
                "--innodb-log-file-size=16M", "--innodb-buffer-pool-size=32M", "--innodb-use-native-aio=0"]


def _cache_path(install_db: str, mariadbd: str, user: str) -> Path:
    """Keyed by the binaries' identity, so a MariaDB upgrade gets a fresh template."""
    ident = [user, *INSTALL_ARGS]
    for binary in (install_db, mariadbd):
        st = os.stat(binary)
        ident += [binary, str(st.st_size), str(st.st_mtime_ns)]
    key = hashlib.sha1("\0".join(ident).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"rwp-template-{os.getuid()}-{key}"


def template_datadir(install_db: str, mariadbd: str) -> Path:
    """A finished install-db datadir, built at most once per machine (it costs seconds on a busy box).

    Built in a private temp dir and renamed into place, so concurrent sandboxes never see half of one.
    """
    user = getpass.getuser()
    cache = _cache_path(install_db, mariadbd, user)
    if cache.is_dir():
        return cache
    tmp = Path(tempfile.mkdtemp(prefix=cache.name + ".tmp-", dir=cache.parent))
    argv = [install_db, "--no-defaults", f"--datadir={tmp}", f"--user={user}", *INSTALL_ARGS]
    try:
        try:
            res = subprocess.run(argv, capture_output=True, text=True, timeout=INSTALL_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise SandboxError(f"mariadb-install-db did not finish within {INSTALL_TIMEOUT}s")
        if res.returncode != 0:
            out = "\n".join("    " + line for line in (res.stdout + res.stderr).splitlines()[-10:])
            raise SandboxError(f"mariadb-install-db failed (exit {res.returncode}):\n{out}")
        try:
            os.rename(tmp, cache)
        except OSError as e:  # another sandbox finished first: use its copy
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return cache


def copy_datadir(template: Path, datadir: Path) -> None:
    datadir.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(template, datadir, symlinks=True)
