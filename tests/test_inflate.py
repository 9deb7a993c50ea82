"""gateway/compression.py without sockets: accept() negotiation and inflate()."""
from __future__ import annotations

import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.compression import RESPONSE, InflateError, accept, inflate

TAIL = b"\x00\x00\xff\xff"


def deflate(data: bytes, level: int = 6, wbits: int = -15, final: bool = False) -> bytes:
    """A client's message payload as RFC 7692 7.2.1 builds it."""
    c = zlib.compressobj(level, zlib.DEFLATED, wbits)
    out = c.compress(data) + c.flush(zlib.Z_FINISH if final else zlib.Z_SYNC_FLUSH)
    if not final:
        assert out.endswith(TAIL)
        out = out[:-4]
    return out


# --- accept(): negotiation ------------------------------------------------------------

def test_response_declares_no_context_takeover_both_ways():
    assert RESPONSE == "permessage-deflate; server_no_context_takeover; client_no_context_takeover"


@pytest.mark.parametrize("offer", [
    "permessage-deflate",
    "PerMessage-Deflate",
    "  permessage-deflate  ",
    "permessage-deflate; client_max_window_bits",
    "permessage-deflate; client_max_window_bits=8",
    "permessage-deflate; client_max_window_bits=15",
    'permessage-deflate; client_max_window_bits="10"',
    "permessage-deflate;client_max_window_bits = 12",
    "permessage-deflate; client_max_window_bits=",           # empty value taken as no value
    "permessage-deflate; server_max_window_bits=15",
    'permessage-deflate; server_max_window_bits="15"',
    "permessage-deflate; server_no_context_takeover",
    "permessage-deflate; client_no_context_takeover",
    "permessage-deflate; Server_No_Context_Takeover",
    "permessage-deflate; server_no_context_takeover; client_no_context_takeover; "
    "server_max_window_bits=15; client_max_window_bits=9",
])
def test_acceptable_offers(offer):
    assert accept([offer]) == RESPONSE


@pytest.mark.parametrize("offer", [
    "",
    "deflate",
    "x-webkit-deflate-frame",
    "permessage-deflate-x",
    "permessage-deflate;",                                    # empty parameter
    "permessage-deflate; unknown_param",
    "permessage-deflate; mux",
    "permessage-deflate; client_max_window_bits=7",
    "permessage-deflate; client_max_window_bits=16",
    "permessage-deflate; client_max_window_bits=ten",
    "permessage-deflate; client_max_window_bits=-9",
    "permessage-deflate; server_max_window_bits",              # needs a value
    "permessage-deflate; server_max_window_bits=",
    "permessage-deflate; server_max_window_bits=14",           # we only compress with 15
    "permessage-deflate; server_max_window_bits=8",
    "permessage-deflate; server_max_window_bits=015x",
    "permessage-deflate; server_no_context_takeover=1",        # takes no value
    "permessage-deflate; client_no_context_takeover=true",
    "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
    "permessage-deflate; client_max_window_bits; client_max_window_bits=10",
    "permessage-deflate; server_no_context_takeover; SERVER_NO_CONTEXT_TAKEOVER",
])
def test_declined_offers(offer):
    assert accept([offer]) is None


def test_no_offers():
    assert accept([]) is None


@pytest.mark.parametrize("offers", [
    ["permessage-deflate; server_max_window_bits=10, permessage-deflate"],   # fallback offer
    ["x-webkit-deflate-frame, permessage-deflate; client_max_window_bits"],
    ["permessage-deflate; bogus", "permessage-deflate"],                     # second header
    ["foo", "bar, permessage-deflate"],
    ["permessage-deflate", "permessage-deflate; bogus"],
])
def test_one_acceptable_offer_among_several(offers):
    assert accept(offers) == RESPONSE


@pytest.mark.parametrize("offers", [
    ["permessage-deflate; server_max_window_bits=10, permessage-deflate; bogus"],
    ["foo", "bar, baz", "permessage-deflate; server_max_window_bits=9"],
    [",", ""],
])
def test_every_offer_declined(offers):
    assert accept(offers) is None


@pytest.mark.parametrize("param", ["server_max_window_bits", "client_max_window_bits"])
def test_non_ascii_digit_window_bits_declined(param):
    assert accept([f"permessage-deflate; {param}=\u00b9\u2075"]) is None


# --- inflate() -------------------------------------------------------------------------

@pytest.mark.parametrize("data", [
    b"", b"x", b'{"type":"subscribe","symbols":["AAPL"]}', bytes(range(256)) * 40,
    b"\x00" * 100000])
def test_round_trip(data):
    assert inflate(deflate(data), len(data)) == data
    assert inflate(deflate(data), len(data) + 1000) == data


def test_stored_and_final_blocks():
    data = b'{"type":"ping"}'
    assert inflate(deflate(data, level=0), 100) == data                # stored block
    assert inflate(deflate(data, final=True), 100) == data             # BFINAL, no tail to strip


def test_smaller_client_window_inflates():
    data = b"abcdefgh" * 500 + bytes(range(256)) * 8
    assert inflate(deflate(data, wbits=-9), len(data)) == data


def test_limit_exactly_at_and_one_over():
    data = b"a" * 5000
    assert inflate(deflate(data), 5000) == data
    with pytest.raises(InflateError) as exc:
        inflate(deflate(data), 4999)
    assert (exc.value.code, exc.value.reason) == (1009, "message too big")
    assert str(exc.value) == "message too big"


def test_limit_zero():
    assert inflate(deflate(b""), 0) == b""
    with pytest.raises(InflateError) as exc:
        inflate(deflate(b"x"), 0)
    assert exc.value.code == 1009


@pytest.mark.parametrize("data", [
    b"\xff\xff\xff\xff",           # reserved block type
    b"\x07",                       # BFINAL + reserved type
    b"\x00\x05\x00\x00\x00",       # stored block whose LEN and NLEN disagree
    b"\x02\xff\xff\xff\xff\xff",   # nonsense in a fixed-Huffman block
])
def test_invalid_data_is_1007(data):
    with pytest.raises(InflateError) as exc:
        inflate(data, 1 << 20)
    assert (exc.value.code, exc.value.reason) == (1007, "invalid compressed data")


def test_context_takeover_from_a_client_is_invalid():
    # The gateway agreed to client_no_context_takeover; a client that still
    # refers back into its previous message sends undecodable data.
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    text = b'{"type":"subscribe","symbols":["AAPL","MSFT","GOOG"]}'
    first = c.compress(text) + c.flush(zlib.Z_SYNC_FLUSH)
    second = c.compress(text) + c.flush(zlib.Z_SYNC_FLUSH)
    assert inflate(first[:-4], 1000) == text
    with pytest.raises(InflateError) as exc:
        inflate(second[:-4], 1000)
    assert exc.value.code == 1007


def test_bomb_is_1009_without_inflating_it_all():
    bomb = deflate(b"\x00" * (16 << 20), level=9)      # 16 MiB of zeros
    assert len(bomb) < 20_000
    with pytest.raises(InflateError) as exc:
        inflate(bomb, 100 * 1024)
    assert exc.value.code == 1009


def test_bomb_in_a_final_block_is_1009():
    bomb = deflate(b"{" * (8 << 20), level=9, final=True)
    with pytest.raises(InflateError) as exc:
        inflate(bomb, 64)
    assert exc.value.code == 1009


@settings(max_examples=100, deadline=None)
@given(data=st.binary(max_size=4096), level=st.integers(0, 9),
       wbits=st.integers(9, 15), final=st.booleans(), slack=st.integers(0, 64))
def test_round_trip_property(data, level, wbits, final, slack):
    payload = deflate(data, level=level, wbits=-wbits, final=final)
    assert inflate(payload, len(data) + slack) == data
    if data:
        with pytest.raises(InflateError) as exc:
            inflate(payload, len(data) - 1)
        assert exc.value.code == 1009


@settings(max_examples=100, deadline=None)
@given(data=st.binary(max_size=512), limit=st.integers(0, 2048))
def test_arbitrary_bytes_never_escape_as_other_errors(data, limit):
    try:
        out = inflate(data, limit)
    except InflateError as exc:
        assert exc.code in (1007, 1009)
    else:
        assert len(out) <= limit
