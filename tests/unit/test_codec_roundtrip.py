"""Property tests: every call's request and reply signature round-trips in every dialect,
and frames survive arbitrary chunking."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
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
    Version,
    build_frame,
    decode_reply,
    decode_request,
    encode_reply,
    encode_request,
)
from p11gate.codec.mechanisms import SERIALIZERS
from p11gate.codec.tables import AttrClass
from p11gate.codec.values import (
    CtrParams,
    Ecdh1Params,
    GcmParams,
    IvParams,
    OaepParams,
    PssParams,
    UlongParam,
)

DIALECTS = [V0241, V025, V026]
u64 = st.integers(0, 2**64 - 1)
u32 = st.integers(0, 2**32 - 2)
small_bytes = st.binary(max_size=40)
opt_bytes = st.one_of(st.none(), small_bytes)


def attribute(d: Dialect, depth: int = 0) -> st.SearchStrategy[Attribute]:
    types = [*sorted(d.attr_classes), 0x3, 0x11, 0x80001234]

    @st.composite
    def build(draw: Any) -> Attribute:
        t = draw(st.sampled_from(types))
        if draw(st.integers(0, 9)) == 0:
            return Attribute(t, None, None)
        cls = d.attr_class(t)
        if cls is AttrClass.BYTE:
            return Attribute(t, draw(st.integers(0, 255)), 1)
        if cls is AttrClass.ULONG:
            return Attribute(t, draw(u64), 8)
        if cls is AttrClass.DATE:
            v = draw(st.one_of(st.none(), st.binary(min_size=8, max_size=8)))
            return Attribute(t, v, 0 if v is None else 8)
        if cls is AttrClass.MECHANISM_ARRAY:
            v = draw(st.lists(u64, max_size=4))
            return Attribute(t, v, 8 * len(v))
        if cls is AttrClass.ATTRIBUTE_ARRAY:
            if depth >= 2:
                return Attribute(t, [], 0)
            inner = draw(st.lists(attribute(d, depth + 1), max_size=3))
            return Attribute(t, inner, 24 * len(inner))
        v = draw(opt_bytes)
        return Attribute(t, v, 0 if v is None else len(v))

    return build()


def mechanism(d: Dialect) -> st.SearchStrategy[Mechanism | None]:
    params: dict[str, st.SearchStrategy[Any]] = {
        "rsa_pkcs_pss_mechanism": st.builds(PssParams, u64, u64, u64),
        "rsa_pkcs_oaep_mechanism": st.builds(OaepParams, u64, u64, u64, opt_bytes),
        "ecdh1_derive_mechanism": st.builds(Ecdh1Params, u64, opt_bytes, opt_bytes),
        "aes_iv_mechanism": st.builds(IvParams, st.binary(min_size=16, max_size=16)),
        "des_iv_mechanism": st.builds(IvParams, st.binary(min_size=8, max_size=8)),
        "aes_ctr_mechanism": st.builds(CtrParams, u64, st.binary(min_size=16, max_size=16)),
        "aes_gcm_mechanism": st.builds(GcmParams, opt_bytes, u64, opt_bytes, u64),
        "mac_general_mechanism": st.builds(UlongParam, u64),
        "ibm_ecdsa_other_mechanism": st.builds(UlongParam, u64),
    }
    choices: list[st.SearchStrategy[Any]] = [
        st.sampled_from(sorted(d.noparam)).map(lambda t: Mechanism(t, None)),
        # a type no table knows carries raw bytes
        st.builds(Mechanism, st.just(0x80009999), opt_bytes),
    ]
    for t, ser in d.serializers.items():
        if ser in params:
            choices.append(params[ser].map(lambda p, t=t: Mechanism(t, p)))
    if d.new_mechanisms:
        choices.append(st.just(None))
    assert set(SERIALIZERS) >= set(d.serializers.values())
    return st.one_of(choices)


def value(code: str, d: Dialect, s_size: int = 32) -> st.SearchStrategy[Any]:
    return {
        "y": st.integers(0, 255),
        "u": u64,
        "v": st.builds(Version, st.integers(0, 255), st.integers(0, 255)),
        "s": st.binary(min_size=s_size, max_size=s_size),
        "z": small_bytes,
        "ay": st.one_of(small_bytes, st.builds(Null, u32), st.none()),
        "au": st.one_of(st.lists(u64, max_size=5), st.builds(Null, u32)),
        "fy": st.integers(0, 2**32 - 1),
        "fu": u32,
        "aA": st.lists(attribute(d), max_size=4),
        "fA": st.lists(st.builds(AttrRequest, st.sampled_from([0, 3, 0x11, 0x102]), u32),
                       max_size=4),
        "M": mechanism(d),
        "P": st.just(ParamUpdate(True)),
    }[code]


@st.composite
def message(draw: Any, d: Dialect, reply: bool) -> tuple[int, list[Any]]:
    call = draw(st.sampled_from([c for c in CALLS[1:] if c.id <= d.max_call_id]))
    codes = call.rep_codes if reply else call.req_codes
    sizes = list(call.rep_s_sizes if reply else call.req_s_sizes)
    out = []
    for c in codes:
        out.append(draw(value(c, d, sizes.pop(0) if c == "s" and sizes else 32)))
    if reply and call.id == 89:
        out[0] = 0
    return call.id, out


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_requests_round_trip(data: st.DataObject) -> None:
    d = data.draw(st.sampled_from(DIALECTS))
    call_id, args = data.draw(message(d, reply=False))
    body = encode_request(call_id, args, d)
    call, decoded = decode_request(body, d)
    assert call.id == call_id
    assert encode_request(call_id, decoded, d) == body


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_replies_round_trip(data: st.DataObject) -> None:
    d = data.draw(st.sampled_from(DIALECTS))
    call_id, values = data.draw(message(d, reply=True))
    request: list[Any] | None = None
    if call_id == 89:
        request = [1, Mechanism(0x1050, Ecdh1Params(1, None, b"x")), 2, []]
    body = encode_reply(call_id, values, d, request)
    decoded = decode_reply(body, d, call_id, request)
    assert encode_reply(call_id, decoded, d, request) == body


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 2**32 - 1), st.binary(max_size=300)), min_size=1,
                max_size=6), st.lists(st.integers(1, 50), min_size=1, max_size=20))
def test_frames_survive_any_chunking(frames: list[tuple[int, bytes]], cuts: list[int]) -> None:
    stream = b"".join(build_frame(code, body, b"client") for code, body in frames)
    reader = FrameReader()
    got = []
    pos = 0
    i = 0
    while pos < len(stream):
        n = cuts[i % len(cuts)]
        got += [(f.code, f.body) for f in reader.feed(stream[pos:pos + n])]
        pos += n
        i += 1
    assert got == frames
    assert reader.pending() == 0
