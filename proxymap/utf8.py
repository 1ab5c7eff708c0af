"""Postfix's UTF-8 dictionary layer, used on both sides of the proxy.

With smtputf8_enable=yes a table opened with UTF8_REQUEST is wrapped so
that keys must be valid UTF-8 (otherwise a lookup finds nothing and an
update or delete is skipped), fixed-string keys are case-folded with full
Unicode folding instead of ASCII folding, and a value that is not UTF-8 is
a configuration error.
"""

from __future__ import annotations


def is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def utf8_key(key: bytes, fold: bool) -> bytes | None:
    """The key as the UTF-8 layer passes it on: None when it is not valid
    UTF-8, else the key, folded with full Unicode case folding if `fold`."""
    try:
        text = key.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return text.casefold().encode("utf-8") if fold else key
