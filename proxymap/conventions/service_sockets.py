"""Where a service listens: $queue_directory/private/NAME or public/NAME.

Postfix's mail classes (MAIL_CLASS_PRIVATE and MAIL_CLASS_PUBLIC in
global/mail_proto.h): a local service's socket is NAME in the `private`
directory of the queue (mode 0700, mail_owner only) or, for a service
that is not private, in `public` (0710, the setgid_group may enter).
The master binds there, a worker started alone listens there by default,
and clients connect there.
"""

from __future__ import annotations

import os

PRIVATE = "private"
PUBLIC = "public"


def socket_class(private: bool) -> str:
    """The directory of a service's socket under $queue_directory."""
    return PRIVATE if private else PUBLIC


def service_socket_path(queue_directory: str, name: str, private: bool = True) -> str:
    """$queue_directory/private/NAME, or .../public/NAME when not private."""
    return os.path.join(queue_directory, socket_class(private), name)
