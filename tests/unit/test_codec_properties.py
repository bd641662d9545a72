"""Property tests: generated values for every call id's request and reply signature, in
every dialect, encode → decode to equal values → re-encode to identical bytes; frames
survive arbitrary chunking through FrameReader."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p11gate.codec import (
    CALLS,
    V0241,
    V025,
    V026,
    Attribute,
    AttrRequest,
    Dialect,
    FrameReader,
    Mechanism,
    Null,
    ParamUpdate,
    ProtocolError,
    Version,
    build_frame,
    decode_reply,
    decode_request,
    encode_reply,
    encode_request,
)
from p11gate.codec.calls import Call
from p11gate.codec.mechanisms import CKM_IBM_BTC_DERIVE, CKM_IBM_KYBER, SERIALIZERS
from p11gate.codec.tables import AttrClass
from p11gate.codec.values import (
    BtcDeriveParams,
    CtrParams,
    DhDeriveParams,
    Ecdh1Params,
    GcmParams,
    HandleParam,
    IvParams,
    KyberParams,
    OaepParams,
    PssParams,
    UlongParam,
)

DIALECTS = [V0241, V025, V026]
IDS = [d.name for d in DIALECTS]
CALL_LIST = [c for c in CALLS if c.id != 0]

u64 = st.integers(0, 2**64 - 1)
u32 = st.integers(0, 2**32 - 1)
u32_not_null = st.integers(0, 2**32 - 2)
byte = st.integers(0, 255)
blob = st.binary(max_size=24)
opt_blob = st.one_of(st.none(), blob)
SETTINGS = settings(max_examples=10, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# ------------------------------------------------------------------ attributes


def attr_types(d: Dialect) -> list[int]:
    # every classified type of the dialect plus byte arrays, a vendor type and a type
    # the other dialect classifies differently
    return sorted({*d.attr_classes, 0x3, 0x11, 0x80001234, 0x40000213, 0x800D0101})


def attribute(d: Dialect, depth: int = 0) -> st.SearchStrategy[Attribute]:
    types = attr_types(d)

    @st.composite
    def build(draw: Any) -> Attribute:
        t = draw(st.sampled_from(types))
        if draw(st.integers(0, 7)) == 0:
            return Attribute(t, None, None)  # unavailable (validity 0)
        extra = draw(st.sampled_from([0, 0, 0, 1, 100]))  # length may exceed the value
        cls = d.attr_class(t)
        if cls is AttrClass.BYTE:
            return Attribute(t, draw(byte), 1 + extra)
        if cls is AttrClass.ULONG:
            return Attribute(t, draw(u64), 8 + extra)
        if cls is AttrClass.DATE:
            v = draw(st.one_of(st.none(), st.binary(min_size=8, max_size=8)))
            return Attribute(t, v, (0 if v is None else 8) + extra)
        if cls is AttrClass.MECHANISM_ARRAY:
            mechs = draw(st.lists(u64, max_size=4))
            return Attribute(t, mechs, 8 * len(mechs) + extra)
        if cls is AttrClass.ATTRIBUTE_ARRAY:
            inner = [] if depth >= 3 else draw(st.lists(attribute(d, depth + 1), max_size=3))
            return Attribute(t, inner, 24 * len(inner) + extra)
        v = draw(opt_blob)
        return Attribute(t, v, (0 if v is None else len(v)) + extra)

    return build()


def attr_request(d: Dialect, depth: int = 0) -> st.SearchStrategy[AttrRequest]:
    types = attr_types(d)

    @st.composite
    def build(draw: Any) -> AttrRequest:
        t = draw(st.sampled_from(types))
        length = draw(st.one_of(st.just(0), u32_not_null))
        if d.nested_fa and length and d.attr_class(t) is AttrClass.ATTRIBUTE_ARRAY:
            nested = [] if depth >= 3 else draw(st.lists(attr_request(d, depth + 1),
                                                        max_size=3))
            length = max(length, 24 * len(nested))
            return AttrRequest(t, length, nested)
        return AttrRequest(t, length, None)

    return build()


# ------------------------------------------------------------------ mechanisms

PARAMS: dict[str, st.SearchStrategy[Any]] = {
    "rsa_pkcs_pss_mechanism": st.builds(PssParams, u64, u64, u64),
    "rsa_pkcs_oaep_mechanism": st.builds(OaepParams, u64, u64, u64, opt_blob),
    "ecdh1_derive_mechanism": st.builds(Ecdh1Params, u64, opt_blob, opt_blob),
    "aes_iv_mechanism": st.builds(IvParams, st.binary(min_size=16, max_size=16)),
    "des_iv_mechanism": st.builds(IvParams, st.binary(min_size=8, max_size=8)),
    "aes_ctr_mechanism": st.builds(CtrParams, u64, st.binary(min_size=16, max_size=16)),
    "aes_gcm_mechanism": st.builds(GcmParams, opt_blob, u64, opt_blob, u64),
    "mac_general_mechanism": st.builds(UlongParam, u64),
    "dh_pkcs_derive_mechanism": st.builds(DhDeriveParams, opt_blob),
    "ibm_attrbound_wrap_mechanism": st.builds(HandleParam, u64),
    "ibm_ecdsa_other_mechanism": st.builds(UlongParam, u64),
    "ibm_btc_derive_mechanism": st.builds(BtcDeriveParams, u64, u64, opt_blob, u64),
    "ibm_kyber_mechanism": st.builds(KyberParams, u64, u64, u64, byte, opt_blob, opt_blob,
                                     u64),
}


def test_every_serializer_has_a_strategy() -> None:
    assert set(PARAMS) == set(SERIALIZERS)
    for d in DIALECTS:
        assert set(d.serializers.values()) <= set(SERIALIZERS)


def mechanism(d: Dialect) -> st.SearchStrategy[Mechanism | None]:
    known = d.noparam | set(d.serializers)
    raw_types = st.integers(0, 2**32 - 2).filter(lambda t: t not in known)
    choices: list[st.SearchStrategy[Any]] = [
        st.sampled_from(sorted(d.noparam)).map(lambda t: Mechanism(t, None)),
        # a type without serializer carries raw parameter bytes (or none)
        st.builds(Mechanism, raw_types, opt_blob),
        st.builds(Mechanism, st.sampled_from([0x1057, 0x80009999]), blob),
        st.just(None),  # NULL mechanism marker ffffffff
    ]
    for t, ser in sorted(d.serializers.items()):
        choices.append(PARAMS[ser].map(lambda p, t=t: Mechanism(t, p)))
        if d.new_mechanisms:
            choices.append(st.just(Mechanism(t, None)))  # has-parameter flag 0
    return st.one_of(choices)


def param_update(d: Dialect, m: Mechanism | None) -> st.SearchStrategy[ParamUpdate]:
    mtype = 0xFFFFFFFF if m is None else m.type
    if mtype in d.noparam:
        return st.just(ParamUpdate(None))
    data = st.one_of(blob, st.none(), st.builds(Null, u32))
    if mtype == CKM_IBM_BTC_DERIVE:
        present = st.builds(ParamUpdate, st.just(True), st.none(), data)
    elif mtype == CKM_IBM_KYBER:
        present = st.one_of(
            st.builds(ParamUpdate, st.just(True), st.just(1), data),
            st.builds(ParamUpdate, st.just(True), st.sampled_from([0, 2, 7]), st.none()),
        )
    else:
        present = st.just(ParamUpdate(True))
    return st.one_of(st.just(ParamUpdate(False)), present)


# ------------------------------------------------------------------ values by code


def value(code: str, d: Dialect, s_size: int) -> st.SearchStrategy[Any]:
    if code == "y":
        return byte
    if code == "u":
        return u64
    if code == "v":
        return st.builds(Version, byte, byte)
    if code == "s":
        return st.binary(min_size=s_size, max_size=s_size)
    if code == "z":
        return blob
    if code == "ay":
        # present data, absent + length (size query / too small), present NULL (01 ffffffff)
        return st.one_of(blob, st.builds(Null, u32), st.none())
    if code == "au":
        return st.one_of(st.lists(u64, max_size=5), st.builds(Null, u32), st.none())
    if code in ("fy", "fu"):
        # 0 = size query, ffffffff in fy = empty non-NULL buffer
        return st.one_of(st.sampled_from([0, 1, 0xFFFFFFFF]), u32)
    if code == "aA":
        return st.lists(attribute(d), max_size=4)
    if code == "fA":
        return st.lists(attr_request(d), max_size=4)
    if code == "M":
        return mechanism(d)
    raise AssertionError(code)


def draw_values(draw: Any, call: Call, d: Dialect, reply: bool) -> list[Any]:
    codes = call.rep_codes if reply else call.req_codes
    sizes = list(call.rep_s_sizes if reply else call.req_s_sizes)
    out: list[Any] = []
    for c in codes:
        if c == "P":
            continue  # C_DeriveKey2 reply: built below from the request's mechanism
        out.append(draw(value(c, d, sizes.pop(0) if c == "s" else 0)))
    if not reply and call.name == "C_SignMessageNext" and out[3] == 0:
        out[4] = 0  # without the signature-length flag p11-kit sends no capacity
    return out


def derive2_reply(draw: Any, d: Dialect, request: list[Any]) -> list[Any]:
    pu = draw(param_update(d, request[1]))
    rv = draw(st.sampled_from([0, 0, 0x150]))
    return [rv, pu, draw(u64)] if rv == 0 else [rv, pu]


def get_attribute_reply(draw: Any, d: Dialect, request: list[Any]) -> list[Any]:
    """A reply that answers the request entry by entry, size queries included."""
    attrs = []
    for req in request[2]:
        t = req.type
        cls = d.attr_class(t)
        if draw(st.integers(0, 5)) == 0:
            attrs.append(Attribute(t, None, None))
        elif req.length == 0:
            # size query: the value part is the type's NULL encoding
            if cls is AttrClass.MECHANISM_ARRAY:
                n = draw(st.integers(0, 50))
                attrs.append(Attribute(t, Null(n), 8 * n))  # p11-kit's count-only form
            elif cls is AttrClass.BYTE:
                attrs.append(Attribute(t, 0, 1))
            elif cls is AttrClass.ULONG:
                attrs.append(Attribute(t, 0, 8))
            elif cls is AttrClass.ATTRIBUTE_ARRAY:
                attrs.append(Attribute(t, [], 0))
            else:
                attrs.append(Attribute(t, None, draw(st.integers(0, 4096))))
        else:
            a = draw(attribute(d))
            attrs.append(Attribute(t, a.value, a.length) if d.attr_class(a.type) is cls
                         else Attribute(t, None, None))
    return [attrs, draw(st.sampled_from([0, 0x11, 0x12, 0x150]))]


# ------------------------------------------------------------------ round trips


def round_trip_request(call: Call, args: list[Any], d: Dialect) -> None:
    body = encode_request(call.id, args, d)
    got_call, got = decode_request(body, d)
    assert got_call is call
    assert got == args, call.name
    assert encode_request(call.id, got, d) == body


def round_trip_reply(call: Call, values: list[Any], d: Dialect, request: list[Any]) -> None:
    body = encode_reply(call.id, values, d, request)
    got = decode_reply(body, d, call.id, request)
    assert got == values, call.name
    assert encode_reply(call.id, got, d, request) == body


@pytest.mark.parametrize("d", DIALECTS, ids=IDS)
@SETTINGS
@given(data=st.data())
def test_every_request_round_trips(d: Dialect, data: st.DataObject) -> None:
    for call in CALL_LIST:
        round_trip_request(call, draw_values(data.draw, call, d, False), d)


@pytest.mark.parametrize("d", DIALECTS, ids=IDS)
@SETTINGS
@given(data=st.data())
def test_every_reply_round_trips(d: Dialect, data: st.DataObject) -> None:
    for call in CALL_LIST:
        request = draw_values(data.draw, call, d, False)
        if call.name == "C_DeriveKey2":
            values = derive2_reply(data.draw, d, request)
        elif call.name == "C_GetAttributeValue":
            values = get_attribute_reply(data.draw, d, request)
        else:
            values = draw_values(data.draw, call, d, True)
        round_trip_reply(call, values, d, request)


@pytest.mark.parametrize("d", DIALECTS, ids=IDS)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_mechanisms_round_trip(d: Dialect, data: st.DataObject) -> None:
    call = CALLS[42]  # C_SignInit uMu
    m = data.draw(mechanism(d))
    round_trip_request(call, [0x11, m, data.draw(u64)], d)


@pytest.mark.parametrize("d", DIALECTS, ids=IDS)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_nested_templates_round_trip(d: Dialect, data: st.DataObject) -> None:
    # C_CreateObject uaA with templates nested up to 4 levels
    attrs = data.draw(st.lists(attribute(d), min_size=1, max_size=6))
    round_trip_request(CALLS[20], [0x11, attrs], d)
    # C_GetAttributeValue uufA with nested fA (≥ 0.25.4 dialects)
    reqs = data.draw(st.lists(attr_request(d), min_size=1, max_size=6))
    round_trip_request(CALLS[24], [0x11, 3, reqs], d)


def test_size_query_forms() -> None:
    for d in DIALECTS:
        # C_Sign size query: fy 0, reply absent + required length
        round_trip_request(CALLS[43], [0x11, b"digest", 0], d)
        round_trip_reply(CALLS[43], [Null(64)], d, [0x11, b"digest", 0])
        # empty-but-present buffer marker, NULL-with-length-0 both ways
        round_trip_request(CALLS[45], [0x11, 0xFFFFFFFF], d)
        round_trip_reply(CALLS[45], [None], d, [0x11, 0xFFFFFFFF])
        round_trip_reply(CALLS[45], [Null(0)], d, [0x11, 0xFFFFFFFF])
        # C_GetSlotList / C_FindObjects count queries
        round_trip_request(CALLS[4], [1, 0], d)
        round_trip_reply(CALLS[4], [Null(3)], d, [1, 0])
        round_trip_reply(CALLS[27], [[]], d, [0x11, 10])


# ------------------------------------------------------------------ C_SignMessageNext


def test_sign_message_next_without_signature_length_omits_fy() -> None:
    """p11-kit writes the fy capacity only after a y of 1 (rpc-client.c
    IN_BYTE_BUFFER_NULL; rpc-server.c reads it the same way)."""
    for d in DIALECTS:
        body = encode_request(81, [0x11, b"p", b"data", 0, 0], d)
        assert body.endswith(b"\x01\x00\x00\x00\x04data\x00")
        assert decode_request(body, d)[1] == [0x11, b"p", b"data", 0, 0]
        body = encode_request(81, [0x11, b"p", b"data", 1, 64], d)
        assert body.endswith(b"data\x01\x00\x00\x00\x40")
        assert decode_request(body, d)[1] == [0x11, b"p", b"data", 1, 64]
        # a non-zero flag is "present" whatever its value, and needs the capacity
        body = encode_request(81, [0x11, b"p", b"data", 7, 0], d)
        assert decode_request(body, d)[1][3:] == [7, 0]
        with pytest.raises(ProtocolError):
            decode_request(body[:-1], d)


def test_sign_message_next_accepts_a_capacity_after_a_zero_flag() -> None:
    # the other form (capacity written anyway) still decodes; it re-encodes as p11-kit
    head = encode_request(81, [0x11, None, b"x", 0, 0], V026)
    got = decode_request(head + b"\x00\x00\x00\x20", V026)[1]
    assert got == [0x11, None, b"x", 0, 0x20]
    assert encode_request(81, got, V026) == head


# ------------------------------------------------------------------ frames


@settings(max_examples=150, deadline=None)
@given(
    frames=st.lists(
        st.tuples(st.integers(1, 2**32 - 1), st.binary(max_size=16), st.binary(max_size=400)),
        min_size=1, max_size=6,
    ),
    cuts=st.lists(st.integers(1, 64), min_size=1, max_size=30),
)
def test_frames_survive_any_chunking(frames: list[tuple[int, bytes, bytes]],
                                     cuts: list[int]) -> None:
    stream = b"".join(build_frame(code, body, opts) for code, opts, body in frames)
    reader = FrameReader()
    got = []
    pos = i = 0
    while pos < len(stream):
        n = cuts[i % len(cuts)]
        got += [(f.code, f.options, f.body) for f in reader.feed(stream[pos:pos + n])]
        pos += n
        i += 1
        assert reader.pending() == len(stream[:pos]) - sum(
            12 + len(o) + len(b) for _, o, b in got)
    assert got == frames
    assert reader.pending() == 0


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_encoded_messages_through_frames(data: st.DataObject) -> None:
    d = data.draw(st.sampled_from(DIALECTS))
    calls = data.draw(st.lists(st.sampled_from(CALL_LIST), min_size=1, max_size=5))
    bodies = [encode_request(c.id, draw_values(data.draw, c, d, False), d) for c in calls]
    stream = b"".join(build_frame(0x10 + i, b, b"client") for i, b in enumerate(bodies))
    cuts = data.draw(st.lists(st.integers(1, len(stream)), max_size=8))
    reader = FrameReader()
    frames = []
    prev = 0
    for c in [*sorted(set(cuts)), len(stream)]:
        frames += list(reader.feed(stream[prev:c]))
        prev = c
    assert [f.code for f in frames] == [0x10 + i for i in range(len(bodies))]
    for f, c, b in zip(frames, calls, bodies, strict=True):
        assert f.options == b"client" and f.body == b
        assert decode_request(f.body, d)[0] is c


@pytest.mark.parametrize("d", DIALECTS, ids=IDS)
@settings(max_examples=5, deadline=None)
@given(data=st.data())
def test_every_serializer_and_param_update(d: Dialect, data: st.DataObject) -> None:
    """Each mechanism with a serializer, in C_DeriveKey2's request and (for each form of
    the parameter update, incl. IBM_BTC_DERIVE/IBM_KYBER data) its reply."""
    for t, ser in sorted(d.serializers.items()):
        m = Mechanism(t, data.draw(PARAMS[ser]))
        request = [0x11, m, 3, data.draw(st.lists(attribute(d), max_size=2))]
        round_trip_request(CALLS[89], request, d)
        round_trip_reply(CALLS[89], derive2_reply(data.draw, d, request), d, request)


def test_bad_iv_lengths_are_argument_errors() -> None:
    from p11gate.codec import ArgumentError

    head = encode_request(42, [0x11, Mechanism(0x1041, None), 3], V026)[:-12]
    for t, good in ((0x1082, 16), (0x122, 8), (0x1086, 16)):
        ctr = b"\x00" * 8 if t == 0x1086 else b""
        for n in (0, good - 1, good + 1):
            body = (head + t.to_bytes(4, "big") + b"\x01" + ctr + n.to_bytes(4, "big")
                    + b"\x00" * n + (3).to_bytes(8, "big"))
            with pytest.raises(ArgumentError):
                decode_request(body, V026)
        bad = Mechanism(t, IvParams(b"\x00" * 3) if t != 0x1086 else CtrParams(1, b"\0" * 3))
        with pytest.raises(ArgumentError):
            encode_request(42, [0x11, bad, 3], V026)
