"""Generic mechanisms, the bottom layer (Postfix's util/).

Nothing here knows about main.cf, maillog or lookup tables: reading
logical lines of a text file, living with the descriptor limit, writing
command output to a reader that may go away. Modules here import only
the standard library and each other; see docs/architecture.md.
"""
