"""Payload signing: PayloadSigner on the selected build, the C SHA-256/HMAC
against hashlib, and identical signatures from the compiled and pure signers."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import sys
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stem import _signer_py
from stem.envelope import Envelope, decode_frame, encode_frame, read_header, with_delivery
from stem.errors import ConfigurationError, SignatureError
from stem.signing import PayloadSigner, parse_keys

OLD = b"old-secret-0123456789abcdef"
NEW = b"new-secret-0123456789abcdef"
SETTINGS = settings(deadline=None, max_examples=200,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def csigner(compiled_twin):
    """The compiled signer (``compiled_twin`` fails or skips when it is not built)."""
    return compiled_twin.signer


def task(**kw) -> Envelope:
    return Envelope(id="t-1", name="report.generate", args={"report_id": 7}, enqueued_at=1.0, **kw)


def config(**kw) -> SimpleNamespace:
    base = dict(signing_algorithm="hmac-sha256", signing_keys={}, signing_public_keys={},
                signing_active_key=None)
    base.update(kw)
    return SimpleNamespace(**base)


# ---- PayloadSigner (HMAC) on the selected build -------------------------------------

def test_hmac_signature_is_rfc_2104_hmac_sha256_of_the_body():
    signer = PayloadSigner({"k1": NEW})
    assert signer.sign(b"body") == (b"k1", hmac.digest(NEW, b"body", "sha256"))
    assert signer.can_sign and signer.algorithm == "hmac-sha256" and signer.active_key == "k1"


def test_verify_accepts_a_good_signature_on_bytes_and_memoryview():
    signer = PayloadSigner({"k1": NEW})
    kid, sig = signer.sign(b"payload")
    signer.verify(kid, sig, b"payload")
    signer.verify(kid, sig, memoryview(b"xpayload")[1:])


@pytest.mark.parametrize("kid, sig, body, message", [
    (b"k1", b"\x00" * 32, b"payload", "does not match"),
    (b"k1", None, b"payload!", "does not match"),
    (b"k1", b"short", b"payload", "32"),
    (b"zz", None, b"payload", "unknown key id"),
])
def test_verify_rejects_bad_signatures_with_signature_error(kid, sig, body, message):
    signer = PayloadSigner({"k1": NEW})
    good = signer.sign(b"payload")[1]
    with pytest.raises(SignatureError, match=message):
        signer.verify(kid, good if sig is None else sig, body)


def test_frame_signed_with_the_old_key_verifies_on_a_signer_that_accepts_both():
    before_rotation = PayloadSigner({"old": OLD})
    during_rotation = PayloadSigner({"old": OLD, "new": NEW}, active_key="new")
    frame = encode_frame(task(), before_rotation)
    assert decode_frame(frame, during_rotation) == task()
    fresh = encode_frame(task(), during_rotation)
    assert read_header(fresh).key_id == b"new"
    with pytest.raises(SignatureError, match="unknown key id"):
        decode_frame(fresh, before_rotation)


def test_frame_signed_with_a_dropped_key_is_rejected_after_rotation():
    frame = encode_frame(task(), PayloadSigner({"old": OLD}))
    with pytest.raises(SignatureError, match="unknown key id b'old'"):
        decode_frame(frame, PayloadSigner({"new": NEW}))


def test_several_keys_without_an_active_key_is_a_configuration_error():
    with pytest.raises(ConfigurationError, match="STEM_SIGNING_ACTIVE_KEY"):
        PayloadSigner({"a": OLD, "b": NEW})


def test_active_key_must_be_one_of_the_keys():
    with pytest.raises(ConfigurationError, match="not among the signing keys"):
        PayloadSigner({"a": OLD}, active_key="b")


@pytest.mark.parametrize("keys, message", [
    ({"k": b"too-short"}, "at least 16"),
    ({"": NEW}, "bad signing key id"),
    ({"x" * 65: NEW}, "bad signing key id"),
    ({"a:b": NEW}, "bad signing key id"),
    ({"a b": NEW}, "bad signing key id"),
    ({"clé": NEW}, "bad signing key id"),
    ({1: NEW}, "key ids are str"),
    ({"k": "c2VjcmV0"}, "parse_keys"),
    ({"k": 12345678901234567}, "must be bytes"),
    ({}, "at least one key"),
    (NEW, "keys must map key ids to secret bytes"),         # a bare secret, the usual slip
    ("c2VjcmV0", "keys must map key ids to secret bytes"),
    (12345, "keys must map key ids to secret bytes"),
    ([NEW], "keys must map key ids to secret bytes"),        # not pairs
])
def test_bad_keys_raise_configuration_error_naming_the_fix(keys, message):
    with pytest.raises(ConfigurationError, match=message):
        PayloadSigner(keys)


def test_unknown_algorithm_is_a_configuration_error():
    with pytest.raises(ConfigurationError, match="hmac-sha256"):
        PayloadSigner({"k": NEW}, algorithm="md5")


def test_keys_may_be_given_as_pairs():
    assert PayloadSigner([("k", NEW)]).key_ids == PayloadSigner({"k": NEW}).key_ids


def test_public_keys_must_be_a_mapping_too():
    with pytest.raises(ConfigurationError, match="public_keys must map key ids"):
        PayloadSigner({}, algorithm="ed25519", public_keys=b"x" * 32)


def test_public_keys_are_refused_for_hmac():
    with pytest.raises(ConfigurationError, match="ed25519"):
        PayloadSigner({"k": NEW}, public_keys={"p": b"\x00" * 32})


def test_repr_never_shows_key_material():
    text = repr(PayloadSigner({"k1": NEW}))
    assert "k1" in text and NEW.decode() not in text and repr(NEW) not in text


def test_key_id_boundaries_of_1_and_64_characters_are_accepted():
    PayloadSigner({"a": NEW})
    signer = PayloadSigner({"k" * 64: NEW})
    decode_frame(encode_frame(task(), signer), signer)


def test_keys_longer_than_a_block_are_hashed_as_rfc_2104_says():
    long_key = bytes(range(200))
    assert PayloadSigner({"k": long_key}).sign(b"x")[1] == hmac.digest(long_key, b"x", "sha256")


# ---- from_config, maybe, parse_keys ------------------------------------------------

def test_from_config_builds_a_signer_from_the_signing_attributes():
    signer = PayloadSigner.from_config(config(signing_keys={"old": OLD, "new": NEW}, signing_active_key="new"))
    assert signer.active_key == "new" and set(signer.key_ids) == {"old", "new"}


def test_from_config_without_keys_is_a_configuration_error():
    with pytest.raises(ConfigurationError, match="STEM_SIGNING_KEYS"):
        PayloadSigner.from_config(config())


def test_maybe_returns_none_when_no_keys_are_configured():
    assert PayloadSigner.maybe(config()) is None
    assert PayloadSigner.maybe(config(signing_keys={"k": NEW})).can_sign


def test_parse_keys_reads_ids_and_base64_secrets():
    text = f" old:{base64.b64encode(OLD).decode()} , new:{base64.urlsafe_b64encode(NEW).decode().rstrip('=')},"
    assert parse_keys(text) == {"old": OLD, "new": NEW}
    assert parse_keys("") == {}


@pytest.mark.parametrize("text, message", [
    ("c2VjcmV0c2VjcmV0c2VjcmV0", "no ':'"),
    ("k:not base64!!", "not valid base64"),
    ("k:", "empty"),
    ("a:c2VjcmV0,a:c2VjcmV0", "twice"),
    (":c2VjcmV0", "bad signing key id"),
])
def test_parse_keys_rejects_bad_input_without_echoing_secrets(text, message):
    with pytest.raises(ConfigurationError, match=message) as info:
        parse_keys(text)
    assert "c2VjcmV0" not in str(info.value)


def test_parsed_keys_make_a_working_signer():
    keys = parse_keys(f"k1:{base64.b64encode(NEW).decode()}")
    signer = PayloadSigner(keys)
    decode_frame(encode_frame(task(), signer), PayloadSigner({"k1": NEW}))


# ---- Ed25519 -----------------------------------------------------------------------

SEED = bytes(range(32))
SEED2 = bytes(range(32, 64))


def public_of(seed: bytes) -> bytes:
    pytest.importorskip("cryptography")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519
    key = ed25519.Ed25519PrivateKey.from_private_bytes(seed).public_key()
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def test_ed25519_signs_and_verifies_a_frame():
    signer = PayloadSigner({"ed": SEED}, algorithm="ed25519")
    frame = encode_frame(task(), signer)
    header = read_header(frame)
    assert header.key_id == b"ed" and len(header.signature) == 64
    assert decode_frame(frame, signer) == task()


def test_ed25519_verify_only_worker_checks_frames_and_cannot_sign():
    producer = PayloadSigner({"ed": SEED}, algorithm="ed25519")
    worker = PayloadSigner({}, algorithm="ed25519", public_keys={"ed": public_of(SEED)})
    assert not worker.can_sign and worker.active_key is None
    frame = encode_frame(task(), producer)
    assert decode_frame(frame, worker) == task()
    retried = with_delivery(frame, attempt=1, not_before=2.0)      # a retry needs no private key
    assert decode_frame(retried, worker).attempt == 1
    with pytest.raises(SignatureError, match="verify but not sign"):
        encode_frame(task(), worker)


def test_ed25519_rejects_a_tampered_frame_and_an_unknown_key():
    producer = PayloadSigner({"ed": SEED}, algorithm="ed25519")
    frame = bytearray(encode_frame(task(), producer))
    frame[-1] ^= 1
    with pytest.raises(SignatureError, match="does not match"):
        decode_frame(bytes(frame), producer)
    stranger = PayloadSigner({"other": SEED2}, algorithm="ed25519")
    with pytest.raises(SignatureError, match="unknown key id"):
        decode_frame(encode_frame(task(), stranger), producer)


def test_ed25519_rotation_accepts_old_and_new_keys():
    worker = PayloadSigner({"new": SEED2}, algorithm="ed25519", public_keys={"old": public_of(SEED)})
    old_frame = encode_frame(task(), PayloadSigner({"old": SEED}, algorithm="ed25519"))
    assert decode_frame(old_frame, worker) == task()
    assert decode_frame(encode_frame(task(), worker), worker) == task()


def test_an_hmac_worker_rejects_an_ed25519_frame_with_the_same_key_id():
    frame = encode_frame(task(), PayloadSigner({"k": SEED}, algorithm="ed25519"))
    with pytest.raises(SignatureError, match="32"):
        decode_frame(frame, PayloadSigner({"k": NEW}))


@pytest.mark.parametrize("kwargs, message", [
    (dict(keys={"ed": b"\x01" * 31}), "32"),
    (dict(keys={}, public_keys={"ed": b"\x01" * 33}), "32"),
    (dict(keys={"ed": SEED}, public_keys={"ed": b"\x01" * 32}), "both"),
])
def test_ed25519_key_sizes_and_conflicts_are_configuration_errors(kwargs, message):
    pytest.importorskip("cryptography")
    with pytest.raises(ConfigurationError, match=message):
        PayloadSigner(algorithm="ed25519", **kwargs)


def test_ed25519_without_cryptography_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "cryptography.exceptions", None)
    with pytest.raises(ConfigurationError, match=r"pip install 'stem-queue\[ed25519\]'"):
        PayloadSigner({"ed": SEED}, algorithm="ed25519")


def test_from_config_builds_an_ed25519_verify_only_signer():
    signer = PayloadSigner.from_config(config(signing_algorithm="ed25519",
                                              signing_public_keys={"ed": public_of(SEED)}))
    assert signer.algorithm == "ed25519" and not signer.can_sign


# ---- the C SHA-256 and HMAC against hashlib ---------------------------------------------

@pytest.mark.parametrize("n", [*range(0, 130), 1000, 4095, 4096, 65535, 65536, 100_000])
def test_sha256_matches_hashlib_around_every_block_boundary(csigner, n):
    data = bytes((i * 7 + n) & 0xFF for i in range(n))
    assert csigner.sha256(data) == hashlib.sha256(data).digest()
    for backend in csigner.SHA256_BACKENDS:
        assert csigner._sha256_with(backend, data) == hashlib.sha256(data).digest(), backend


@SETTINGS
@given(data=st.binary(max_size=2000))
def test_sha256_matches_hashlib_on_random_data_with_every_backend(csigner, data):
    assert csigner.sha256(data) == hashlib.sha256(data).digest()
    for backend in csigner.SHA256_BACKENDS:
        assert csigner._sha256_with(backend, data) == hashlib.sha256(data).digest(), backend


@pytest.mark.parametrize("backend", ["sha-ni", "bmi2", "portable"])
def test_hmac_signer_gives_the_same_signatures_on_every_backend(csigner, backend):
    if backend not in csigner.SHA256_BACKENDS:
        pytest.skip(f"this CPU has no {backend}")
    signer = csigner.HmacSigner({b"k": NEW, b"long": bytes(range(100))}, b"k")
    bodies = [bytes(i & 0xFF for i in range(n)) for n in (0, 1, 55, 56, 63, 64, 65, 119, 120, 300, 1000, 70_000)]
    previous = csigner._use_sha256_backend(backend)
    try:
        for body in bodies:
            assert signer.sign(body)[1] == hmac.digest(NEW, body, "sha256")
            assert csigner.hmac_sha256(bytes(range(100)), body) == hmac.digest(bytes(range(100)), body, "sha256")
    finally:
        csigner._use_sha256_backend(previous)


def test_an_unknown_sha256_backend_is_refused(csigner):
    with pytest.raises(ValueError, match="not available"):
        csigner._sha256_with("quantum", b"")


@SETTINGS
@given(key=st.binary(min_size=1, max_size=200), data=st.binary(max_size=2000))
def test_hmac_sha256_matches_the_hmac_module(twin, key, data):
    assert twin.signer.hmac_sha256(key, data) == hmac.digest(key, data, "sha256")


@SETTINGS
@given(a=st.binary(max_size=40), b=st.binary(max_size=40))
def test_constant_time_equal_agrees_with_equality(twin, a, b):
    assert twin.signer.constant_time_equal(a, b) is (a == b)
    assert twin.signer.constant_time_equal(a, a)


def test_sha256_backend_is_named(csigner):
    assert csigner.SHA256_BACKEND == csigner.SHA256_BACKENDS[0]
    assert set(csigner.SHA256_BACKENDS) <= {"sha-ni", "bmi2", "portable"} and "portable" in csigner.SHA256_BACKENDS
    assert _signer_py.SHA256_BACKEND == "hashlib"


# ---- compiled vs pure HmacSigner ---------------------------------------------------

@SETTINGS
@given(secret=st.binary(min_size=1, max_size=130), body=st.binary(max_size=3000))
def test_compiled_and_pure_signers_give_identical_signatures(csigner, secret, body):
    c = csigner.HmacSigner({b"k": secret}, b"k")
    py = _signer_py.HmacSigner({b"k": secret}, b"k")
    assert c.sign(body) == py.sign(body) == (b"k", hmac.digest(secret, body, "sha256"))
    kid, sig = c.sign(body)
    py.verify(kid, sig, body)
    c.verify(kid, sig, memoryview(body))


def test_compiled_and_pure_signers_agree_on_a_large_body_hashed_without_the_gil(csigner):
    body = os.urandom(300_000)
    c = csigner.HmacSigner({b"k": NEW}, b"k")
    assert c.sign(body) == _signer_py.HmacSigner({b"k": NEW}, b"k").sign(body)
    c.verify(*c.sign(body), body)


@pytest.mark.parametrize("kid, sig, message", [
    (b"k", b"\x00" * 32, "does not match"),
    (b"k", b"\x00" * 31, "31 bytes"),
    (b"x", b"\x00" * 32, "unknown key id b'x'"),
])
def test_both_signers_reject_alike(csigner, kid, sig, message):
    msgs = []
    for mod in (csigner, _signer_py):
        with pytest.raises(SignatureError, match=message) as info:
            mod.HmacSigner({b"k": NEW}, b"k").verify(kid, sig, b"body")
        msgs.append(str(info.value))
    assert msgs[0] == msgs[1]


def test_a_signer_without_an_active_key_only_verifies(twin):
    verifier = twin.signer.HmacSigner({b"k": NEW})
    assert not verifier.can_sign
    verifier.verify(b"k", hmac.digest(NEW, b"b", "sha256"), b"b")
    with pytest.raises(SignatureError, match="only verify"):
        verifier.sign(b"b")


def test_low_level_signer_rejects_non_bytes_keys(twin):
    with pytest.raises(ConfigurationError):
        twin.signer.HmacSigner({"k": NEW}, None)
    with pytest.raises(ConfigurationError):
        twin.signer.HmacSigner({}, None)
