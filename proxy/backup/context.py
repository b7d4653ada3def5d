"""A config's [backup] section opened: the repository, the keys, the spool directory."""

from __future__ import annotations

import os

from proxy.backup import codec
from proxy.backup.repo import open_repository
from proxy.backup.servers import BackupError


class BackupContext:
    def __init__(self, config):
        self.config = config
        b = config.backup
        if not b.repository:
            raise BackupError(f"{config.source}: [backup] repository is not set (e.g. \"file:///var/backups/rwproxy\" "
                              f"or \"s3://bucket/prefix\")")
        self.repo = open_repository(b.repository, endpoint=b.s3_endpoint, region=b.s3_region,
                                    access_key=b.s3_access_key, secret_key=b.s3_secret_key)
        try:
            self.keys = codec.load_keys(b.recipients, b.key_file)
        except codec.CodecError as e:
            raise BackupError(str(e)) from None

    def spool(self) -> str:
        """Where the binlog reader writes: [backup] spool_dir, else this instance's runtime directory."""
        from proxy.runtime.rundir import path_for

        return self.config.backup.spool_dir or os.path.join(path_for(self.config), "binlog-spool")
