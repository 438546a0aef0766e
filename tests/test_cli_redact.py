"""stem.redact: no password in anything stem prints."""

from __future__ import annotations

import pytest

from stem.redact import mask_url, mask_urls


@pytest.mark.parametrize("url, masked", [
    ("redis://:secret@localhost:6379/0", "redis://:***@localhost:6379/0"),
    ("redis://user:secret@localhost:6379/0", "redis://user:***@localhost:6379/0"),
    ("rediss://default:secret@cache.example:6380/1?ssl_cert_reqs=none",
     "rediss://default:***@cache.example:6380/1?ssl_cert_reqs=none"),
    ("unix://:secret@/var/run/redis.sock?db=2", "unix://:***@/var/run/redis.sock?db=2"),
    ("unix:///var/run/redis.sock?db=2&password=secret", "unix:///var/run/redis.sock?db=2&password=***"),
    ("postgresql://app:secret@db.example/stem", "postgresql://app:***@db.example/stem"),
    ("postgres://app:secret@db.example:5432/stem?sslmode=require",
     "postgres://app:***@db.example:5432/stem?sslmode=require"),
    ("postgresql://app@db.example/stem?password=secret&sslpassword=secret2#frag",
     "postgresql://app@db.example/stem?password=***&sslpassword=***#frag"),
    ("redis://:pa/ss@w?rd@host:6379/0", "redis://:***@host:6379/0"),      # unencoded / ? @ in a password
    ("redis:/:secret@host", "redis:***@host"),                              # a typo is still masked
])
def test_a_password_is_masked_in_every_scheme_stem_accepts(url, masked):
    assert mask_url(url) == masked
    assert "secret" not in mask_url(url)


@pytest.mark.parametrize("url", ["redis://localhost:6379/0", "sqlite:///var/lib/stem/stem.db", "memory://",
                                 "memory://demo", "postgresql://app@db/stem?application_name=a@b",
                                 "sqlite:///tmp/odd@name.db", "redis://:@host/0", "nope"])
def test_a_url_without_a_password_is_left_as_given(url):
    assert mask_url(url) == url


def test_every_url_inside_a_message_is_masked():
    message = ("bad Redis URL 'redis://:secret@h:x/0': invalid port; backend postgresql://u:secret@db/x "
               "also failed")
    assert mask_urls(message) == ("bad Redis URL 'redis://:***@h:x/0': invalid port; backend "
                                  "postgresql://u:***@db/x also failed")
    assert mask_urls("no url here: a:b@c") == "no url here: a:b@c"
