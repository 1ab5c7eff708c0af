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


def add_version_option(parser, program: str) -> None:
    """`--version` on an argparse parser: prints version_line(program) and
    exits. The version is looked up only then: importlib.metadata costs
    about 1 MB in every process that imports it (the master, each worker)."""
    import argparse

    class VersionAction(argparse.Action):
        def __init__(self, option_strings, dest, **kwargs):
            super().__init__(option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS,
                             nargs=0, help="show program's version number and exit")

        def __call__(self, parser, namespace, values, option_string=None):
            print(version_line(program))
            parser.exit()

    parser.add_argument("--version", action=VersionAction)
