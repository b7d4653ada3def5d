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

from proxy.sandbox.util import SandboxError, private_dir

INSTALL_TIMEOUT = 180
# Same InnoDB sizes as my.cnf, so a node's first start does not have to resize the redo log.
INSTALL_ARGS = ["--auth-root-authentication-method=normal", "--skip-test-db",
                "--innodb-log-file-size=16M", "--innodb-buffer-pool-size=32M", "--innodb-use-native-aio=0"]


DONE = ".rwp-template-complete"  # written last: a template without it is rebuilt


def cache_root() -> Path:
    """A directory only this user can write (0700, owned by it): $XDG_CACHE_HOME/rwproxy or
    ~/.cache/rwproxy. Not /tmp: the template's name is computable, and a datadir another local
    user placed there first (say, with an account of theirs) would have become every sandbox's."""
    try:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rwproxy"
        private_dir(base)
        return base
    except (OSError, RuntimeError):  # no usable home (a system user in a container): a private /tmp one
        base = Path(tempfile.gettempdir()) / f"rwproxy-cache-{os.getuid()}"
        private_dir(base)  # (refused, not used, if another user made it first)
        return base


def _cache_path(install_db: str, mariadbd: str, user: str) -> Path:
    """Keyed by the binaries' identity, so a MariaDB upgrade gets a fresh template."""
    ident = [user, *INSTALL_ARGS]
    for binary in (install_db, mariadbd):
        st = os.stat(binary)
        ident += [binary, str(st.st_size), str(st.st_mtime_ns)]
    key = hashlib.sha1("\0".join(ident).encode()).hexdigest()[:12]
    return cache_root() / f"template-{key}"


def template_datadir(install_db: str, mariadbd: str) -> Path:
    """A finished install-db datadir, built at most once per machine (it costs seconds on a busy box).

    Built in a private temp dir and renamed into place, so concurrent sandboxes never see half of one.
    """
    user = getpass.getuser()
    cache = _cache_path(install_db, mariadbd, user)
    if (cache / DONE).is_file():
        return cache
    if cache.exists():  # half a template (an old cleaner, a disk that filled up): build it again
        shutil.rmtree(cache, ignore_errors=True)
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
        (tmp / DONE).write_text("")
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
    shutil.copytree(template, datadir, symlinks=True, ignore=shutil.ignore_patterns(DONE))
