"""Postfix-wide conventions that every program of ours follows (Postfix's global/).

Reading main.cf, the parameter declarations and their defaults, `$name`
expansion, value conversion, the configuration error format, maillog and
the version of the Postfix installed beside us. Everything above (the
codec, the tables, the worker, the master) may use these; modules here
import only proxymap.util and each other; see docs/architecture.md.
"""
