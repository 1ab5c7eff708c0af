"""The supervisor side: Postfix-wide configuration (main.cf, master.cf),
logging conventions, and a pre-fork master that hands connections to
proxymap workers."""
