"""The attribute codec: framing, limits, request layouts, reply encoding."""

import pytest
from hypothesis import given, strategies as st

from proxymap.protocol import (BAD, GREETING, BadRequest, Decoder, ProtocolError, encode,
                               encode_reply, parse_request, parse_uint)

LOOKUP = b"request\0lookup\0table\0hash:/etc/aliases\0flags\x00524353\0key\0foo\0\0"


def test_greeting_is_the_28_bytes_postfix_sends():
    assert GREETING == bytes.fromhex(
        "70726f746f636f6c0070726f78796d61705f70726f746f636f6c0000")
    assert Decoder().feed(GREETING) == [[(b"protocol", b"proxymap_protocol")]]


def test_partial_reads_are_buffered_until_the_terminator():
    d = Decoder()
    for i in range(len(LOOKUP) - 1):
        assert d.feed(LOOKUP[i:i + 1]) == []
    assert d.feed(LOOKUP[-1:]) == [[(b"request", b"lookup"), (b"table", b"hash:/etc/aliases"),
                                    (b"flags", b"524353"), (b"key", b"foo")]]
    assert d.pending == 0


def test_several_requests_in_one_read_come_out_in_order():
    second = b"request\0open\0table\0btree:/x\0flags\x000\0\0"
    lists = Decoder().feed(LOOKUP + second + LOOKUP[:10])
    assert [dict(l)[b"request"] for l in lists] == [b"lookup", b"open"]


def test_empty_values_and_binary_bytes_survive():
    msg = encode([("key", b""), ("value", b"\xff\xfe")])
    assert Decoder().feed(msg) == [[(b"key", b""), (b"value", b"\xff\xfe")]]


def test_too_many_attributes_is_a_protocol_error():
    d = Decoder(max_attrs=4)
    with pytest.raises(ProtocolError):
        d.feed(b"a\0b\0" * 5 + b"\0")


def test_unfinished_request_over_the_size_limit_is_a_protocol_error():
    d = Decoder(max_message=100)
    with pytest.raises(ProtocolError):
        d.feed(b"request\0lookup\0key\0" + b"x" * 200)


def test_complete_request_over_the_size_limit_is_a_protocol_error():
    d = Decoder(max_message=100)
    with pytest.raises(ProtocolError):
        d.feed(b"request\0lookup\0key\0" + b"x" * 200 + b"\0\0")


def test_integers_wrap_like_sscanf_percent_u():
    assert parse_uint(b"524353") == 524353
    assert parse_uint(b"-1") == 4294967295
    assert parse_uint(b" 7") == 7
    assert parse_uint(b"+7") == 7
    for bad in (b"abc", b"", b"-"):
        with pytest.raises(ValueError):
            parse_uint(bad)


def test_encode_prints_negative_ints_as_unsigned():
    assert encode([("status", -1)]) == b"status\x004294967295\0\0"


def test_37_lookup_layout():
    req = parse_request(Decoder().feed(LOOKUP)[0])
    assert (req.name, req.table, req.flags, req.key, req.layout) == \
        ("lookup", "hash:/etc/aliases", 524353, b"foo", 37)


def test_311_layout_detected_by_instance_flags():
    raw = b"request\0lookup\0table\0hash:/a\0instance_flags\x0065536\0flags\x0016\0key\0k\0\0"
    req = parse_request(Decoder().feed(raw)[0])
    assert (req.layout, req.instance_flags, req.flags) == (311, 65536, 16)
    raw = b"request\0open\0table\0hash:/a\0instance_flags\x00524288\0\0"
    req = parse_request(Decoder().feed(raw)[0])
    assert (req.layout, req.flags) == (311, 524288)


@pytest.mark.parametrize("raw, name", [
    (b"request\0lookup\0table\0hash:/a\0flags\x000\0\0", "lookup"),            # missing key
    (b"request\0lookup\0table\0hash:/a\0flags\0abc\0key\0k\0\0", "lookup"),   # bad number
    (b"request\0lookup\0flags\x000\0table\0t:x\0key\0k\0\0", "lookup"),       # wrong order
    (b"request\0lookup\0table\0t:x\0flags\x000\0key\0k\0extra\0x\0\0", "lookup"),
    (b"request\0frobnicate\0\0", None),
    (b"table\0t:x\0\0", None),
])
def test_malformed_requests_are_bad(raw, name):
    with pytest.raises(BadRequest) as info:
        parse_request(Decoder().feed(raw)[0])
    assert info.value.name == name


def test_reply_layouts_match_the_captured_37_bytes():
    assert encode_reply("lookup", 1) == b"status\x001\0value\0\0\0"
    assert encode_reply("open", 0, flags=28) == b"status\x000\0flags\x0028\0\0"
    assert encode_reply("sequence", 1) == b"status\x001\0key\0\0value\0\0\0"
    assert encode_reply("delete", 0) == b"status\x000\0\0"
    assert encode_reply(None, BAD) == b"status\x003\0\0"


def test_reply_311_carries_flags_after_status():
    assert encode_reply("lookup", 0, 311, flags=16, value=b"v") == \
        b"status\x000\0flags\x0016\0value\0v\0\0"


names = st.binary(min_size=1, max_size=20).filter(lambda b: b"\0" not in b)
values = st.binary(max_size=50).filter(lambda b: b"\0" not in b)
lists = st.lists(st.tuples(names, values), max_size=8)


@given(st.lists(lists, max_size=5), st.lists(st.integers(1, 40), max_size=20))
def test_any_chunking_decodes_to_the_encoded_lists(messages, cuts):
    data = b"".join(encode(m) for m in messages)
    d = Decoder(max_attrs=64)
    out, pos = [], 0
    for cut in cuts:
        out += d.feed(data[pos:pos + cut])
        pos += cut
    out += d.feed(data[pos:])
    assert out == [list(m) for m in messages]
    assert d.pending == 0


@given(st.binary(max_size=300))
def test_garbage_never_raises_anything_but_protocol_error(data):
    d = Decoder(max_attrs=8, max_message=128)
    try:
        for attrs in d.feed(data):
            try:
                parse_request(attrs)
            except BadRequest:
                pass
    except ProtocolError:
        pass
