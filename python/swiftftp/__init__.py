"""SwiftFTP proxy: makes FTP servers behind NAT reachable from any ordinary FTP client."""

__version__ = "0.1.0"
