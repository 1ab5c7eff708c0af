"""DICT_FLAG bits as Postfix 3.7's util/dict.h numbers them.

Clients send these bits in the `flags` attribute of every request; the
server keeps one flags word per shared table instance and tables consult it
(case folding, NUL conventions, locking, duplicate handling).
"""

DUP_WARN = 1 << 0
DUP_IGNORE = 1 << 1
TRY0NULL = 1 << 2
TRY1NULL = 1 << 3
FIXED = 1 << 4
PATTERN = 1 << 5
LOCK = 1 << 6
DUP_REPLACE = 1 << 7
SYNC_UPDATE = 1 << 8
DEBUG = 1 << 9
NO_REGSUB = 1 << 11
NO_PROXY = 1 << 12
NO_UNAUTH = 1 << 13
FOLD_FIX = 1 << 14
FOLD_MUL = 1 << 15
OPEN_LOCK = 1 << 16
BULK_UPDATE = 1 << 17
MULTI_WRITER = 1 << 18
UTF8_REQUEST = 1 << 19
UTF8_ACTIVE = 1 << 20
SRC_RHS_IS_FILE = 1 << 21
#: Postfix 3.11 marks surrogate instances with DICT_FLAG_SURROGATE, which its
#: dict.h defines as `(1<22)`: a comparison, so the bit set is bit 0
SURROGATE_311 = 1

# Masks of Postfix 3.7: implementation bits are set by the table, request
# bits change per call, instance bits are fixed when the table is opened.
IMPL_MASK = FIXED | PATTERN | MULTI_WRITER
RQST_MASK = (DUP_WARN | DUP_IGNORE | LOCK | DUP_REPLACE | SYNC_UPDATE
             | NO_REGSUB | NO_PROXY | NO_UNAUTH | FOLD_FIX | FOLD_MUL
             | UTF8_REQUEST)
INST_MASK = 0xFFFFFFFF & ~(IMPL_MASK | RQST_MASK)
FOLD_ANY = FOLD_FIX | FOLD_MUL

assert IMPL_MASK == 0x40030 and RQST_MASK == 0x8F9C3 and INST_MASK == 0xFFF3060C


def fold_ascii(key: bytes) -> bytes:
    """Lower-case ASCII letters only, as Postfix's C-locale FOLD_FIX does."""
    return key.lower()  # bytes.lower() touches only A-Z
