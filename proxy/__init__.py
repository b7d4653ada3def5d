"""rwproxy: a MySQL-protocol read/write-splitting proxy."""

__version__ = "0.1.0"
