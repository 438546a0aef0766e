"""The envelope and its wire frame.

Three layers: the public ``stem.envelope`` API on whichever build is selected;
properties (hypothesis) run on both builds in one process through the
``twin`` fixture of conftest.py (ids ``c``/``py``); cross-checks that the compiled and pure
codecs write identical bytes and read each other's frames.
"""

from __future__ import annotations

import collections
import hmac
import os
import re
import math
import struct

import msgspec
import msgspec.structs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stem import _codec_py, _signer_py, envelope
from stem.envelope import (
    DEFAULT_MAX_FRAME_SIZE, HEADER_SIZE, MAGIC, WIRE_VERSION, Envelope, FrameHeader, decode_body,
    decode_frame, decode_value, encode_body, encode_frame, encode_value, frame_encoder, read_header,
    with_delivery,
)
from stem.errors import DecodeError, EncodeError, SignatureError
from stem.signing import PayloadSigner

SECRET = b"0123456789abcdef0123456789abcdef"
OTHER_SECRET = b"fedcba9876543210fedcba9876543210"
HEADER = struct.Struct("<2sBBBBHIId")
DELIVERY_BYTES = set(range(8, 12)) | set(range(16, 24))   # attempt, not_before: unsigned on purpose
SETTINGS = settings(deadline=None, max_examples=100,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


class Build:
    def __init__(self, name, codec_module, signer_module):
        self.name = name
        self.codec = codec_module.FrameCodec(Envelope, FrameHeader)
        self.signer = signer_module.HmacSigner({b"k1": SECRET, b"k0": OTHER_SECRET}, b"k1")
        self.signer_module = signer_module


@pytest.fixture(scope="module")
def build(twin) -> Build:
    """A codec and signer of each build in turn (``twin``: ``c``, then ``py``)."""
    return Build(twin.id, twin.codec, twin.signer)


@pytest.fixture(scope="module")
def both(compiled_twin) -> tuple[Build, Build]:
    return Build("c", compiled_twin.codec, compiled_twin.signer), Build("py", _codec_py, _signer_py)


@pytest.fixture
def signer() -> PayloadSigner:
    return PayloadSigner({"k1": SECRET})


def sample(**overrides) -> Envelope:
    fields = dict(id="0193f4a2-7c1e-7d3a-9b2f-4c8e1a2b3c4d", name="email.send",
                  args={"to": "alice@example.com", "n": 3, "tags": ["a", "b"], "blob": b"\x00\x01"},
                  headers={"trace": "abc"}, meta={"tenant": "acme"}, queue="mail", priority=5,
                  max_retries=3, enqueued_at=1_700_000_000.25, expires_at=1_700_000_600.0,
                  soft_time_limit=10.0, hard_time_limit=20.0, parent_id="p", root_id="r")
    fields.update(overrides)
    return Envelope(**fields)


# ---- strategies -------------------------------------------------------------------

scalars = (st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats(allow_nan=False)
           | st.text(max_size=20) | st.binary(max_size=20))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=10)
optional_float = st.none() | st.floats(allow_nan=False)
optional_text = st.none() | st.text(max_size=20)
envelopes = st.builds(
    Envelope,
    id=st.text(max_size=40), name=st.text(min_size=1, max_size=40),
    args=st.dictionaries(st.text(max_size=10), values, max_size=5),
    headers=st.dictionaries(st.text(max_size=10), st.text(max_size=20), max_size=3),
    meta=st.dictionaries(st.text(max_size=10), values, max_size=3),
    queue=st.text(max_size=20), priority=st.integers(-2**63, 2**63 - 1),
    attempt=st.integers(0, 2**32 - 1), max_retries=st.integers(0, 2**31),
    enqueued_at=st.floats(allow_nan=False), not_before=optional_float, expires_at=optional_float,
    visibility_timeout=optional_float, soft_time_limit=optional_float, hard_time_limit=optional_float,
    parent_id=optional_text, root_id=optional_text,
)


def raw_frame(body: bytes, *, magic=MAGIC, version=WIRE_VERSION, flags=0, key=b"", sig=b"", reserved=0,
              attempt=0, body_len=None, not_before=math.nan) -> bytes:
    header = HEADER.pack(magic, version, flags, len(key), len(sig), reserved, attempt,
                         len(body) if body_len is None else body_len, not_before)
    return header + key + sig + body


# ---- the public API, on the selected build ------------------------------------------

def test_envelope_round_trips_through_an_unsigned_frame():
    env = sample(attempt=2, not_before=1_700_000_100.5)
    assert decode_frame(encode_frame(env)) == env


def test_signed_frame_round_trips_when_the_signature_verifies(signer):
    env = sample()
    assert decode_frame(encode_frame(env, signer), signer) == env


def test_frame_header_has_the_documented_layout(signer):
    env = sample(attempt=7, not_before=None)
    frame = encode_frame(env, signer)
    magic, version, flags, key_len, sig_len, reserved, attempt, body_len, not_before = HEADER.unpack_from(frame)
    assert (magic, version, flags, reserved) == (b"\xa7S", 1, 0, 0)
    assert (key_len, sig_len, attempt) == (2, 32, 7)
    assert math.isnan(not_before)
    assert frame[24:26] == b"k1"
    body = frame[24 + 2 + 32:]
    assert len(body) == body_len and body == encode_body(env)
    assert frame[26:58] == hmac.digest(SECRET, body, "sha256")     # the signature covers exactly the body
    assert HEADER_SIZE == 24 and len(frame) == 24 + 2 + 32 + body_len


def test_unsigned_frame_has_empty_key_and_signature():
    frame = encode_frame(sample())
    assert frame[4:6] == b"\x00\x00"
    assert frame[24:] == encode_body(sample())


def test_decode_takes_attempt_and_not_before_from_the_delivery_header(signer):
    frame = encode_frame(sample(attempt=0, not_before=None), signer)
    moved = with_delivery(frame, attempt=4, not_before=1_700_000_999.0)
    env = decode_frame(moved, signer)
    assert (env.attempt, env.not_before) == (4, 1_700_000_999.0)
    assert decode_body(read_header(moved).body).attempt == 0       # the body keeps the first publish


def test_with_delivery_rewrites_only_the_header_and_needs_no_key(signer):
    frame = encode_frame(sample(not_before=5.0), signer)
    moved = with_delivery(frame, attempt=1, not_before=None)
    assert len(moved) == len(frame)
    assert moved[:8] == frame[:8] and moved[12:16] == frame[12:16] and moved[24:] == frame[24:]
    header = read_header(moved)
    assert (header.attempt, header.not_before) == (1, None)
    decode_frame(moved, signer)                                     # still verifies


def test_read_header_returns_the_fields_without_decoding_the_body(signer):
    frame = encode_frame(sample(attempt=3, not_before=42.5), signer)
    header = read_header(frame)
    assert isinstance(header, FrameHeader)
    assert (header.version, header.key_id, header.attempt, header.not_before) == (1, b"k1", 3, 42.5)
    assert len(header.signature) == 32 and bytes(header.body) == encode_body(sample(attempt=3, not_before=42.5))
    garbage_body = raw_frame(b"\xc1\xc1\xc1", attempt=9, not_before=1.0)
    assert read_header(garbage_body).attempt == 9


def test_any_object_with_sign_and_verify_can_sign_frames():
    class Reversed:
        def sign(self, body):
            return b"rev", bytes(body)[::-1][:16]

        def verify(self, key_id, signature, body):
            if bytes(body)[::-1][:16] != signature:
                raise SignatureError("mismatch")

    frame = encode_frame(sample(), Reversed())
    assert read_header(frame).key_id == b"rev"
    assert decode_frame(frame, Reversed()) == sample()


def test_a_frame_encoder_writes_the_bytes_encode_frame_writes(signer):
    for env in (sample(), sample(args={}, headers={}, meta={}, expires_at=None)):
        assert frame_encoder(signer)(env) == encode_frame(env, signer)
        assert frame_encoder()(env) == encode_frame(env)
    with pytest.raises(EncodeError, match="max_size"):
        frame_encoder(signer, max_size=HEADER_SIZE + 10)(sample())
    with pytest.raises(EncodeError):
        frame_encoder(signer)(sample(args={"x": object()}))


def test_signed_frame_decodes_without_a_signer(signer):
    assert decode_frame(encode_frame(sample(), signer)) == sample()


def test_unsigned_frame_is_rejected_when_a_signer_is_required(signer):
    with pytest.raises(SignatureError, match="unsigned"):
        decode_frame(encode_frame(sample()), signer)


def test_frame_signed_with_an_unknown_key_id_raises_signature_error(signer):
    stranger = PayloadSigner({"k9": OTHER_SECRET})
    with pytest.raises(SignatureError, match="unknown key id"):
        decode_frame(encode_frame(sample(), stranger), signer)


def test_frame_signed_with_another_secret_under_the_same_id_raises_signature_error(signer):
    impostor = PayloadSigner({"k1": OTHER_SECRET})
    with pytest.raises(SignatureError, match="does not match"):
        decode_frame(encode_frame(sample(), impostor), signer)


def test_signature_is_verified_before_the_body_is_decoded(signer):
    frame = encode_frame(sample(), signer)
    forged = frame[:12] + struct.pack("<I", 3) + frame[16:58] + b"\xc1\xc1\xc1"   # garbage body, valid lengths
    with pytest.raises(SignatureError):
        decode_frame(forged, signer)
    with pytest.raises(DecodeError):
        decode_frame(forged)


def test_truncated_frame_raises_decode_error(signer):
    frame = encode_frame(sample(), signer)
    for n in range(len(frame)):
        with pytest.raises(DecodeError):
            decode_frame(frame[:n], signer)
        with pytest.raises(DecodeError):
            read_header(frame[:n])


def test_frame_with_trailing_bytes_raises_decode_error():
    with pytest.raises(DecodeError, match="length mismatch"):
        decode_frame(encode_frame(sample()) + b"\x00")


def test_oversized_frame_is_rejected_before_anything_is_parsed():
    with pytest.raises(DecodeError, match="max_size"):
        decode_frame(b"\xff" * (DEFAULT_MAX_FRAME_SIZE + 1))        # bad magic too: size comes first
    with pytest.raises(DecodeError, match="max_size"):
        read_header(b"\xff" * 1000, max_size=999)


def test_max_size_parameter_is_honoured_to_the_byte():
    frame = encode_frame(sample())
    assert decode_frame(frame, max_size=len(frame)) == sample()
    with pytest.raises(DecodeError, match=f"max_size={len(frame) - 1}"):
        decode_frame(frame, max_size=len(frame) - 1)


def test_encode_refuses_a_frame_larger_than_max_size():
    with pytest.raises(EncodeError, match="max_size"):
        encode_frame(sample(args={"blob": b"x" * 1000}), max_size=500)


@pytest.mark.parametrize("frame, message", [
    (raw_frame(b"\x90", magic=b"PK"), "not a stem frame"),
    (raw_frame(b"\x90", version=2), "unsupported wire version 2"),
    (raw_frame(b"\x90", version=0), "unsupported wire version 0"),
    (raw_frame(b"\x90", flags=1), "flags"),
    (raw_frame(b"\x90", reserved=1), "reserved"),
    (raw_frame(b"\x90", key=b"k1"), "malformed"),
    (raw_frame(b"\x90", sig=b"s" * 32), "malformed"),
    (raw_frame(b"\x90", body_len=2), "truncated"),
    (raw_frame(b"\x90\x90", body_len=1), "length mismatch"),
])
def test_malformed_header_raises_decode_error(frame, message):
    with pytest.raises(DecodeError, match=message):
        decode_frame(frame)
    with pytest.raises(DecodeError, match=message):
        read_header(frame)
    with pytest.raises(DecodeError, match=message):
        with_delivery(frame, attempt=1, not_before=None)


@pytest.mark.parametrize("body", [
    b"\xc1",                                               # never-used msgpack byte
    b"\x92",                                               # array cut short
    msgspec.msgpack.encode(["id"]),                        # missing required field
    msgspec.msgpack.encode([1, "name"]),                   # id is not a str
    msgspec.msgpack.encode({"id": "x", "name": "y"}),      # a map where an array belongs
    msgspec.msgpack.encode(["id", "name", {"a": 1}, {"h": 1}]),   # header value not a str
    msgspec.msgpack.encode(["id", "name", {1: 2}]),        # args key not a str
    msgspec.msgpack.encode(["id", "name", {}, {}, {}, "q", True]),  # priority is a bool
    b"\x93\xa1i\xa1n\x81\xa1a" + b"\x91" * 5000 + b"\xc0",  # nested past the recursion limit
    b"",
])
def test_garbage_or_mistyped_body_raises_decode_error(body):
    with pytest.raises(DecodeError):
        decode_frame(raw_frame(body))
    with pytest.raises(DecodeError):
        decode_body(body)


def test_decode_error_is_also_a_value_error():
    with pytest.raises(ValueError):
        decode_frame(b"nope")


def test_frames_decode_from_memoryview_and_bytearray(signer):
    frame = encode_frame(sample(), signer)
    assert decode_frame(memoryview(frame), signer) == sample()
    assert decode_frame(bytearray(frame), signer) == sample()
    assert decode_frame(memoryview(b"xx" + frame)[2:], signer) == sample()
    assert read_header(bytearray(frame)).key_id == b"k1"
    assert with_delivery(memoryview(frame), attempt=1, not_before=None)[24:] == frame[24:]


def test_decoding_a_bytearray_leaves_no_view_of_it_behind(build):
    frame = bytearray(build.codec.encode_frame(sample(), build.signer))
    build.codec.decode_frame(frame, build.signer)
    with pytest.raises(DecodeError):
        build.codec.decode_frame(frame[:-1] + b"\xc1", None)
    frame.extend(b"resizable again")            # BufferError if a view still exported it


def test_a_frame_argument_that_is_not_bytes_like_raises_type_error():
    with pytest.raises(TypeError):
        decode_frame("not bytes")


@pytest.mark.parametrize("bad, message", [
    (dict(args={"x": object()}), "cannot encode task"),
    (dict(args={"x": 2**64}), "cannot encode task"),
    (dict(meta={"x": {1j: 1}}), "cannot encode task"),
    (dict(args={1: "x"}), "args keys must be str"),
    (dict(meta={b"k": 1}), "meta keys must be str"),
    (dict(headers={"h": 1}), "headers values must be str"),
    (dict(args=[1, 2]), "args must be a dict"),
    (dict(attempt=-1), "attempt"),
    (dict(attempt=2**32), "attempt"),
    (dict(attempt=True), "attempt"),
    (dict(not_before="soon"), "not_before"),
])
def test_encode_frame_rejects_what_cannot_travel_with_encode_error(bad, message, signer):
    with pytest.raises(EncodeError, match=message):
        encode_frame(sample(**bad), signer)


def test_encode_frame_rejects_something_that_is_not_an_envelope():
    with pytest.raises(EncodeError, match="expected Envelope"):
        encode_frame({"id": "x"})


def test_encode_error_for_self_referencing_args_is_encode_error():
    args: dict = {}
    args["me"] = args
    with pytest.raises(EncodeError):
        encode_frame(sample(args=args))


def test_with_delivery_rejects_an_attempt_outside_u32(signer):
    frame = encode_frame(sample(), signer)
    with pytest.raises(EncodeError):
        with_delivery(frame, attempt=2**32, not_before=None)


def test_plain_values_round_trip_for_results():
    value = {"ok": True, "items": [1, 2.5, "three", None, b"\x04"], "nested": {"n": -7}}
    assert decode_value(encode_value(value)) == value
    with pytest.raises(EncodeError):
        encode_value(object())
    with pytest.raises(DecodeError):
        decode_value(b"\xc1")


def test_envelope_defaults_are_not_shared_between_instances():
    a, b = Envelope(id="a", name="t"), Envelope(id="b", name="t")
    a.args["x"] = 1
    assert b.args == {} and a.headers is not b.headers and a.meta is not b.meta
    assert (b.queue, b.priority, b.attempt, b.not_before, b.root_id) == ("default", 0, 0, None, None)


def test_a_body_with_extra_trailing_fields_from_a_newer_stem_still_decodes():
    fields = list(msgspec.structs.astuple(sample())) + ["a field added later", 42]
    assert decode_frame(raw_frame(msgspec.msgpack.encode(fields))) == sample()


def test_a_body_missing_trailing_fields_from_an_older_stem_gets_the_defaults():
    fields = list(msgspec.structs.astuple(sample()))[:5]
    env = decode_frame(raw_frame(msgspec.msgpack.encode(fields)))
    assert (env.id, env.queue, env.root_id) == (sample().id, "default", None)


# ---- properties, on both builds -------------------------------------------------------

@SETTINGS
@given(env=envelopes)
def test_random_envelopes_round_trip_through_signed_frames(build, env):
    frame = build.codec.encode_frame(env, build.signer)
    assert build.codec.decode_frame(frame, build.signer) == env
    assert build.codec.decode_frame(frame) == env


@SETTINGS
@given(data=st.binary(max_size=300))
def test_random_garbage_raises_only_decode_error(build, data):
    with pytest.raises(DecodeError):
        build.codec.decode_frame(data)
    with pytest.raises((DecodeError, SignatureError)):
        build.codec.decode_frame(data, build.signer)


@SETTINGS
@given(body=st.binary(max_size=300), attempt=st.integers(0, 2**32 - 1), nb=st.floats())
def test_a_valid_header_over_a_random_body_decodes_or_raises_decode_error(build, body, attempt, nb):
    frame = raw_frame(body, attempt=attempt, not_before=nb)
    try:
        env = build.codec.decode_frame(frame)
    except DecodeError:
        return
    assert isinstance(env, Envelope) and env.attempt == attempt


@SETTINGS
@given(env=envelopes, data=st.data())
def test_every_truncation_of_a_valid_frame_raises_decode_error(build, env, data):
    frame = build.codec.encode_frame(env, build.signer)
    n = data.draw(st.integers(0, len(frame) - 1))
    with pytest.raises(DecodeError):
        build.codec.decode_frame(frame[:n], build.signer)


@SETTINGS
@given(env=envelopes, data=st.data())
def test_a_flipped_byte_in_a_signed_frame_never_yields_an_altered_task(build, env, data):
    frame = build.codec.encode_frame(env, build.signer)
    pos = data.draw(st.integers(0, len(frame) - 1))
    flipped = bytearray(frame)
    flipped[pos] ^= data.draw(st.integers(1, 255))
    try:
        got = build.codec.decode_frame(bytes(flipped), build.signer)
    except (SignatureError, DecodeError):
        return
    assert pos in DELIVERY_BYTES, f"byte {pos} changed and the frame still verified"
    assert msgspec.structs.replace(got, attempt=env.attempt, not_before=env.not_before) == env


@SETTINGS
@given(env=envelopes, data=st.data())
def test_a_flipped_byte_in_an_unsigned_frame_decodes_or_raises_decode_error(build, env, data):
    frame = build.codec.encode_frame(env)
    pos = data.draw(st.integers(0, len(frame) - 1))
    flipped = bytearray(frame)
    flipped[pos] ^= data.draw(st.integers(1, 255))
    try:
        build.codec.decode_frame(bytes(flipped))
    except DecodeError:
        pass


@SETTINGS
@given(env=envelopes, data=st.data())
def test_frames_over_max_size_are_rejected_before_any_decode(build, env, data):
    frame = build.codec.encode_frame(env, build.signer)
    limit = data.draw(st.integers(0, len(frame) - 1))
    with pytest.raises(DecodeError, match="max_size"):
        build.codec.decode_frame(frame, build.signer, limit)
    with pytest.raises(DecodeError, match="max_size"):
        build.codec.read_header(frame, limit)
    assert build.codec.decode_frame(frame, build.signer, len(frame)) == env


@SETTINGS
@given(env=envelopes, attempt=st.integers(0, 2**32 - 1), nb=optional_float)
def test_with_delivery_changes_only_attempt_and_not_before(build, env, attempt, nb):
    frame = build.codec.with_delivery(build.codec.encode_frame(env, build.signer), attempt, nb)
    got = build.codec.decode_frame(frame, build.signer)
    assert (got.attempt, got.not_before) == (attempt, nb)
    assert msgspec.structs.replace(got, attempt=env.attempt, not_before=env.not_before) == env


# ---- cross-checks: compiled vs pure ------------------------------------------------------

@SETTINGS
@given(env=envelopes)
def test_compiled_and_pure_codecs_write_identical_frames(both, env):
    c, py = both
    assert c.codec.encode_frame(env) == py.codec.encode_frame(env)
    assert c.codec.encode_frame(env, c.signer) == py.codec.encode_frame(env, py.signer)
    assert c.codec.encode_body(env) == py.codec.encode_body(env)


@SETTINGS
@given(env=envelopes)
def test_a_frame_encoded_by_one_build_decodes_with_the_other(both, env):
    c, py = both
    assert py.codec.decode_frame(c.codec.encode_frame(env, c.signer), py.signer) == env
    assert c.codec.decode_frame(py.codec.encode_frame(env, py.signer), c.signer) == env


@SETTINGS
@given(env=envelopes)
def test_each_codec_works_with_the_other_builds_signer(both, env):
    c, py = both
    assert c.codec.encode_frame(env, py.signer) == py.codec.encode_frame(env, c.signer)
    assert c.codec.decode_frame(py.codec.encode_frame(env, c.signer), py.signer) == env


@SETTINGS
@given(env=envelopes, attempt=st.integers(0, 2**32 - 1), nb=optional_float)
def test_both_builds_rewrite_the_delivery_header_identically(both, env, attempt, nb):
    c, py = both
    frame = c.codec.encode_frame(env, c.signer)
    assert c.codec.with_delivery(frame, attempt, nb) == py.codec.with_delivery(frame, attempt, nb)
    hc, hp = c.codec.read_header(frame), py.codec.read_header(frame)
    assert hc[:5] == hp[:5] and bytes(hc.body) == bytes(hp.body)


@SETTINGS
@given(data=st.binary(max_size=120) | st.builds(lambda b, k: raw_frame(b, key=k[:1], sig=k[1:]),
                                                 st.binary(max_size=60), st.binary(max_size=40)))
def test_both_builds_reject_a_bad_frame_with_the_same_error(both, data):
    c, py = both
    outcomes = []
    for b in (c, py):
        try:
            b.codec.decode_frame(data, b.signer)
            outcomes.append(("ok",))
        except (DecodeError, SignatureError) as exc:
            outcomes.append((type(exc), str(exc)))
    assert outcomes[0] == outcomes[1]


def test_both_builds_report_encode_errors_alike(both):
    c, py = both
    for bad in (sample(args={1: 2}), sample(args={"x": object()}), sample(attempt=-1), sample(headers={"a": 1})):
        errors = []
        for b in (c, py):
            with pytest.raises(EncodeError) as info:
                b.codec.encode_frame(bad, b.signer)
            errors.append(str(info.value))
        assert errors[0] == errors[1]


# ---- encode_frames: a batch of one task name, spliced --------------------------------------

class _PySigner:
    """A signer without the compiled C API: the codec calls its sign() with the body."""

    def sign(self, body):
        return b"py", hmac.new(SECRET, bytes(body), "sha256").digest()


def _one_by_one(build, env, ids, args_list, signer, max_size=DEFAULT_MAX_FRAME_SIZE):
    return [build.codec.encode_frame(msgspec.structs.replace(env, id=i, args=a), signer, max_size)
            for i, a in zip(ids, args_list)]


@SETTINGS
@given(env=envelopes, data=st.data())
def test_encode_frames_writes_what_encode_frame_writes_for_each_task(build, env, data):
    ids = data.draw(st.lists(st.text(max_size=300), max_size=6))
    args_list = data.draw(st.lists(st.dictionaries(st.text(max_size=10), values, max_size=4),
                                   min_size=len(ids), max_size=len(ids)))
    for signer in (None, build.signer, _PySigner()):
        assert build.codec.encode_frames(env, ids, args_list, signer) == _one_by_one(build, env, ids, args_list,
                                                                                     signer)


def test_encode_frames_handles_every_msgpack_string_header_for_the_id(build):
    ids = ["", "x" * 31, "x" * 32, "é" * 128, "y" * 300, "z" * 70_000]   # fixstr, str8, str16, str32
    args_list = [{}, {"a": 1}, {}, {"b": [1, 2]}, {}, {"c": "d"}]
    env = sample(attempt=2, not_before=7.5)
    assert build.codec.encode_frames(env, ids, args_list, build.signer) == _one_by_one(build, env, ids, args_list,
                                                                                       build.signer)


def test_the_public_encode_frames_takes_a_payload_signer(signer):
    env = sample()
    frames = envelope.encode_frames(env, ["a", "b"], [{}, {"n": 1}], signer)
    assert [decode_frame(f, signer) for f in frames] == [msgspec.structs.replace(env, id="a", args={}),
                                                         msgspec.structs.replace(env, id="b", args={"n": 1})]


@pytest.mark.parametrize("ids, args_list, error, message", [
    (["a", 7], [{}, {}], EncodeError, "task id must be a str"),
    (["a"], [{1: "x"}], EncodeError, "args keys must be str"),
    (["a"], [{"x": object()}], EncodeError, "cannot encode task"),
    (["a"], [[1, 2]], EncodeError, "args must be a dict"),
    (["a", "b"], [{}], ValueError, "2 ids for 1 args"),
])
def test_encode_frames_rejects_what_encode_frame_rejects(build, ids, args_list, error, message):
    with pytest.raises(error, match=message):
        build.codec.encode_frames(sample(), ids, args_list, build.signer)


def test_encode_frames_honours_max_size_and_checks_a_python_signer(build):
    with pytest.raises(EncodeError, match="max_size"):
        build.codec.encode_frames(sample(), ["a"], [{"x": "y" * 100}], None, HEADER_SIZE + 50)

    class Bad:
        def sign(self, body):
            return b"k", "not bytes"

    with pytest.raises(SignatureError, match="bad signature"):
        build.codec.encode_frames(sample(), ["a"], [{}], Bad())


def test_encode_frames_of_a_struct_laid_out_otherwise_encodes_each_envelope(build):
    """The splice assumes id, name, args lead the array; any other layout takes the slow road."""
    rest = [("args", dict, {}), ("headers", dict, {}), ("meta", dict, {}), ("attempt", int, 0),
            ("not_before", float | None, None)]
    reordered = msgspec.defstruct("Reordered", [("name", str), ("id", str), *rest], array_like=True)
    keyed = msgspec.defstruct("Keyed", [("id", str), ("name", str), *rest])

    for kind in (reordered, keyed):
        codec = type(build.codec)(kind, FrameHeader)
        env = kind(name="t", id="", args={})
        frames = codec.encode_frames(env, ["a", "b"], [{"x": 1}, {}], build.signer)
        assert frames == [codec.encode_frame(msgspec.structs.replace(env, id=i, args=a), build.signer)
                          for i, a in (("a", {"x": 1}), ("b", {}))]


# ---- XaddTemplate: a single enqueue's whole XADD in one call ---------------------------

XADD_HEAD = b"*11\r\n$4\r\nXADD\r\n$16\r\nns:{q:mail}:lane:5\r\n$1\r\n*\r\n$1\r\nt\r\n"
XADD_TAIL = b"$1\r\np\r\n$1\r\n5\r\n$1\r\nv\r\n$5\r\n30000\r\n"
templates = st.builds(
    Envelope,
    id=st.just(""), name=st.text(min_size=1, max_size=300), args=st.just({}),
    headers=st.just({}), meta=st.just({}), queue=st.text(max_size=20), priority=st.integers(-2**63, 2**63 - 1),
    attempt=st.just(0), max_retries=st.integers(0, 2**31), enqueued_at=st.just(0.0),
    visibility_timeout=optional_float, soft_time_limit=optional_float, hard_time_limit=optional_float,
    unset_options=st.lists(st.text(max_size=10), max_size=3), unique_until=optional_text,
    result_ttl=optional_float, failure_ttl=optional_float, ignore_result=st.none() | st.booleans(),
)


def _expected_xadd(env: Envelope, task_id: str, args, now: float, expires, signer, head=XADD_HEAD,
                   tail=XADD_TAIL) -> bytes:
    """What the producer's general path sends: the envelope framed by ``encode_frame`` and
    spliced between the lane's head and tail (``RedisBroker.publish``)."""
    full = msgspec.structs.replace(env, id=task_id, args={} if args is None else args, enqueued_at=now,
                                   expires_at=None if expires is None else now + expires)
    frame = encode_frame(full, signer)
    tid = task_id.encode()
    return b"%s$%d\r\n%s\r\n$1\r\nf\r\n$%d\r\n%s\r\n%s" % (head, len(tid), tid, len(frame), frame, tail)


@SETTINGS
@given(env=templates, task_id=st.text(min_size=1, max_size=300),
       args=st.none() | st.dictionaries(st.text(max_size=10), values, max_size=5),
       now=st.floats(allow_nan=False), expires=st.none() | st.floats(allow_nan=False, allow_infinity=False),
       signed=st.booleans())
def test_both_builds_make_the_xadd_the_general_path_sends_byte_for_byte(both, env, task_id, args, now,
                                                                        expires, signed):
    made = []
    for b in both:
        t = b.codec.xadd_template(env, b.signer if signed else None, XADD_HEAD, XADD_TAIL, expires)
        made.append(t.build(args, now, task_id))
    public = PayloadSigner({"k1": SECRET, "k0": OTHER_SECRET}, "k1") if signed else None
    assert made[0] == made[1] == (task_id, _expected_xadd(env, task_id, args, now, expires, public))


def test_a_template_makes_a_new_uuid4_id_per_call(build):
    t = build.codec.xadd_template(sample(id="", args={}, headers={}, meta={}, enqueued_at=0.0, expires_at=None),
                                  build.signer, XADD_HEAD, XADD_TAIL, 60.0)
    ids = set()
    for i in range(200):     # past one pool of random bytes (32 ids) several times
        task_id, command = t.build({"i": i}, 1_700_000_000.5)
        assert re.fullmatch(r"[0-9a-f]{12}4[0-9a-f]{3}[89ab][0-9a-f]{15}", task_id)
        assert command == _expected_xadd(t_env(), task_id, {"i": i}, 1_700_000_000.5, 60.0,
                                          PayloadSigner({"k1": SECRET, "k0": OTHER_SECRET}, "k1"))
        ids.add(task_id)
    assert len(ids) == 200


def t_env() -> Envelope:
    return sample(id="", args={}, headers={}, meta={}, enqueued_at=0.0, expires_at=None)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_never_makes_its_parents_next_ids(build):
    """The compiled template draws ids from a pool of random bytes: a child forked with part
    of it unused must not hand out the ids its parent hands out next."""
    t = build.codec.xadd_template(t_env(), None, XADD_HEAD, XADD_TAIL, None)
    t.build(None, 1.0)                        # the pool is filled, 31 ids left in it
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.write(write, "".join(t.build(None, 1.0)[0] for _ in range(8)).encode())
        finally:
            os._exit(0)
    os.close(write)
    child = b""
    while len(child) < 8 * 32:
        chunk = os.read(read, 4096)
        assert chunk, "the child wrote nothing"
        child += chunk
    os.close(read)
    os.waitpid(pid, 0)
    parent = "".join(t.build(None, 1.0)[0] for _ in range(8)).encode()
    child_ids = {child[i:i + 32] for i in range(0, len(child), 32)}
    parent_ids = {parent[i:i + 32] for i in range(0, len(parent), 32)}
    assert not child_ids & parent_ids


@pytest.mark.parametrize("args", [[1], "x", {1: "int key"}, {"x": object()}, {"x": 2**64}, {"x": 1j},
                                  collections.OrderedDict(a=1)])
def test_what_the_general_path_refuses_makes_no_command(build, args):
    """None sends the producer down the general path, which raises its usual error."""
    t = build.codec.xadd_template(t_env(), build.signer, XADD_HEAD, XADD_TAIL, None)
    assert t.build(args, 1.0) is None


def test_a_frame_past_max_size_makes_no_command(build):
    env = t_env()
    t = build.codec.xadd_template(env, build.signer, XADD_HEAD, XADD_TAIL, None, 400)
    assert t.build({"x": "a" * 100}, 1.0, "id") is not None
    assert t.build({"x": "a" * 400}, 1.0, "id") is None


def test_a_template_signs_with_any_object_with_sign_as_encode_frame_does(both):
    class Custom:
        def sign(self, body):
            return b"kid", hmac.digest(SECRET, body, "sha256")[:20]

    made = [b.codec.xadd_template(t_env(), Custom(), XADD_HEAD, XADD_TAIL, None).build({"a": 1}, 5.0, "x")
            for b in both]
    assert made[0] == made[1] == ("x", _expected_xadd(t_env(), "x", {"a": 1}, 5.0, None, Custom()))

    class Bad:
        def sign(self, body):
            return b"kid", "not bytes"
    for b in both:
        with pytest.raises(SignatureError, match="bad signature"):
            b.codec.xadd_template(t_env(), Bad(), XADD_HEAD, XADD_TAIL, None).build({}, 1.0)


@pytest.mark.parametrize("overrides", [dict(id="x"), dict(args={"a": 1}), dict(enqueued_at=1.0), dict(attempt=1),
                                       dict(not_before=1.0), dict(expires_at=2.0)])
def test_a_template_envelope_leaves_the_per_task_fields_empty(build, overrides):
    with pytest.raises(ValueError, match="template envelope"):
        build.codec.xadd_template(msgspec.structs.replace(t_env(), **overrides), None, XADD_HEAD, XADD_TAIL, None)


def test_a_template_refuses_what_is_not_one(build):
    with pytest.raises(TypeError):
        build.codec.xadd_template(object(), None, XADD_HEAD, XADD_TAIL, None)
    with pytest.raises(TypeError):
        build.codec.xadd_template(t_env(), None, None, XADD_TAIL, None)
    with pytest.raises(TypeError):
        build.codec.xadd_template(t_env(), None, XADD_HEAD, XADD_TAIL, "60")
    with pytest.raises(EncodeError):
        build.codec.xadd_template(msgspec.structs.replace(t_env(), headers={"a": 1}), None, XADD_HEAD, XADD_TAIL,
                                  None)
    t = build.codec.xadd_template(t_env(), None, XADD_HEAD, XADD_TAIL, None)
    with pytest.raises(TypeError):
        t.build({}, 1.0, 5)


def test_the_public_template_takes_a_payload_signer(signer):
    t = envelope.xadd_template(t_env(), signer, XADD_HEAD, XADD_TAIL, 10.0)
    task_id, command = t.build({"a": 1}, 7.0)
    assert command == _expected_xadd(t_env(), task_id, {"a": 1}, 7.0, 10.0, signer)
