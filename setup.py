"""Build of the optional compiled hot path (proxymap/_hotpath.c).

Everything else about the package is declared in setup.cfg. The extension
is optional: where it cannot be compiled (no C compiler, no Python
headers) the install goes on without it and the pure-Python hot path
serves (proxymap/protocol.py chooses at import).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("proxymap._hotpath", ["proxymap/_hotpath.c"], optional=True)])
