"""A Postfix-compatible proxymap(8)/proxywrite service written in Python.

The package mirrors Postfix's proxymap server: `protocol` is the attribute
codec spoken on the sockets, `dispatch` answers requests, `server` is the
worker process, `tables` holds one module per lookup-table type.
"""

DISTRIBUTION = "pyproxymap"


def version() -> str:
    """The installed distribution's version (setup.cfg is the one source),
    shown by `--version` on every command."""
    from importlib import metadata
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "unknown"


def version_line(program: str) -> str:
    return f"{program} ({DISTRIBUTION}) {version()}"
