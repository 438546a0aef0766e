"""Frame codec and HMAC signer: compiled (``c``) vs pure twin (``py``) in one group.

    .venv/bin/python -m pytest benchmarks/test_codec.py -p no:cacheprovider \
        --benchmark-only --benchmark-group-by=group -q

Each group holds the compiled and the pure path on the same envelope, so the
ratio comes from one run.  Results and the machine: benchmarks/README.md.

To emulate a CPU without SHA-NI, mask it for OpenSSL (hashlib, the pure path)
and pick another block function for the compiled path:

    OPENSSL_ia32cap=":~0x20000000" STEM_BENCH_SHA256=bmi2 .venv/bin/python -m pytest ...
"""

from __future__ import annotations

import os

import pytest

from benchmarks._twins import codec_builds

from stem.envelope import Envelope, FrameHeader

SECRET = b"benchmark-secret-0123456789abcdef"


BUILDS = codec_builds()


@pytest.fixture(scope="module", autouse=True)
def sha256_backend():
    """Honour STEM_BENCH_SHA256 (sha-ni | bmi2 | portable) for the compiled signer."""
    backend = os.environ.get("STEM_BENCH_SHA256")
    if not backend or "c" not in BUILDS:
        yield
        return
    signer_mod = BUILDS["c"][1]
    previous = signer_mod._use_sha256_backend(backend)
    yield
    signer_mod._use_sha256_backend(previous)


def envelope(size: str) -> Envelope:
    """A realistic task: ~300 bytes of body, or ~1 KiB with a longer text argument."""
    text = "Hello Alice, welcome to stem. " * (2 if size == "300B" else 27)
    return Envelope(
        id="0193f4a2-7c1e-7d3a-9b2f-4c8e1a2b3c4d", name="email.send",
        args={"to": "alice@example.com", "subject": "Welcome to stem", "body": text, "priority": 3},
        headers={"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"},
        meta={"tenant": "acme"}, queue="mail", max_retries=3, enqueued_at=1_717_000_000.123,
        expires_at=1_717_003_600.0, soft_time_limit=30.0, root_id="0193f4a2-7c1e-7d3a-9b2f-4c8e1a2b3c4d")


def setup(impl: str, size: str):
    if impl not in BUILDS:
        pytest.skip("stem._speedups is not built (make build)")
    codec_mod, signer_mod = BUILDS[impl]
    codec = codec_mod.FrameCodec(Envelope, FrameHeader)
    signer = signer_mod.HmacSigner({b"2024-06": SECRET}, b"2024-06")
    env = envelope(size)
    return codec, signer, env, codec.encode_frame(env, signer)


SIZES = ["300B", "1KiB"]
IMPLS = ["c", "py"]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("impl", IMPLS)
def test_encode_and_sign(benchmark, impl, size):
    codec, signer, env, frame = setup(impl, size)
    benchmark.group = f"encode+sign {size}"
    benchmark.extra_info["frame_bytes"] = len(frame)
    assert benchmark(codec.encode_frame, env, signer) == frame


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("impl", IMPLS)
def test_verify_and_decode(benchmark, impl, size):
    codec, signer, env, frame = setup(impl, size)
    benchmark.group = f"verify+decode {size}"
    benchmark.extra_info["frame_bytes"] = len(frame)
    assert benchmark(codec.decode_frame, frame, signer) == env


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("impl", IMPLS)
def test_hmac_sign_only(benchmark, impl, size):
    codec, signer, env, _ = setup(impl, size)
    body = codec.encode_body(env)
    benchmark.group = f"hmac sign only {size}"
    benchmark(signer.sign, body)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("impl", IMPLS)
def test_encode_unsigned(benchmark, impl, size):
    codec, _, env, _ = setup(impl, size)
    benchmark.group = f"encode unsigned {size}"
    benchmark(codec.encode_frame, env)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("impl", IMPLS)
def test_decode_unsigned(benchmark, impl, size):
    codec, _, env, _ = setup(impl, size)
    frame = codec.encode_frame(env)
    benchmark.group = f"decode unsigned {size}"
    benchmark(codec.decode_frame, frame)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("impl", [*IMPLS, "c, one by one"])
def test_encode_frames_batch(benchmark, impl, size):
    """500 signed frames of one task name: ``encode_frames`` (the compiled one splices each body
    from pieces encoded once) vs ``encode_frame`` of an Envelope per task, as the general path does."""
    import msgspec
    codec, signer, env, _ = setup(impl.split(",")[0], size)
    ids = [f"{i:032x}" for i in range(500)]
    args_list = [dict(env.args, n=i) for i in range(500)]
    benchmark.group = f"encode+sign 500 frames of one task, {size}"
    if impl == "c, one by one":
        replace = msgspec.structs.replace

        def run():
            return [codec.encode_frame(replace(env, id=i, args=a), signer) for i, a in zip(ids, args_list)]
    else:
        def run():
            return codec.encode_frames(env, ids, args_list, signer)
    frames = benchmark(run)
    assert frames[7] == codec.encode_frame(msgspec.structs.replace(env, id=ids[7], args=args_list[7]), signer)


@pytest.mark.parametrize("impl", [*IMPLS, "c, general path"])
def test_single_xadd_build(benchmark, impl):
    """One task's whole signed XADD (``XaddTemplate.build``: id, body, HMAC, command) against
    what the general path does for it with the compiled codec: an Envelope, ``encode_frame``,
    the splice between the lane's head and tail."""
    import msgspec.structs
    codec, signer, env, _ = setup(impl.split(",")[0], "300B")
    shared = msgspec.structs.replace(env, id="", args={}, headers={}, meta={}, enqueued_at=0.0, expires_at=None,
                                     root_id=None)
    head = b"*11\r\n$4\r\nXADD\r\n$22\r\nstem:{q:mail}:lane:0\r\n$1\r\n*\r\n$1\r\nt\r\n"
    tail = b"$1\r\np\r\n$1\r\n0\r\n$1\r\nv\r\n$1\r\n0\r\n"
    args = {"to": "alice@example.com", "n": 3}
    benchmark.group = "single xadd build"
    if impl == "c, general path":
        def general():
            task_id = os.urandom(16).hex()
            frame = codec.encode_frame(msgspec.structs.replace(shared, id=task_id, args=args, enqueued_at=1.5), signer)
            tid = task_id.encode()
            return b"%s$%d\r\n%s\r\n$1\r\nf\r\n$%d\r\n%s\r\n%s" % (head, len(tid), tid, len(frame), frame, tail)
        benchmark(general)
        return
    template = codec.xadd_template(shared, signer, head, tail, 3600.0)
    assert benchmark(template.build, args, 1.5) is not None
