"""A Postfix-compatible proxymap(8)/proxywrite service written in Python.

The package mirrors Postfix's proxymap server: `protocol` is the attribute
codec spoken on the sockets, `dispatch` answers requests, `server` is the
worker process, `tables` holds one module per lookup-table type.
"""
