"""The authority shared by the ``redis+sentinel://`` and ``redis+cluster://`` URL forms
(``stem.stores.redis_urls``): one parser, so both forms take the same addresses."""

from __future__ import annotations

import pytest

from stem.errors import ConfigurationError
from stem.stores.redis_cluster import parse_cluster_url
from stem.stores.redis_sentinel import parse_sentinel_url
from stem.stores.redis_urls import AddressError, parse_addresses, split_authority


def test_an_address_list_takes_names_ipv4_bracketed_ipv6_and_default_ports():
    assert parse_addresses("10.0.0.1:7000, [::1]:7001,node-3,[fe80::2],", 6379) == [
        ("10.0.0.1", 7000), ("::1", 7001), ("node-3", 6379), ("fe80::2", 6379)]
    assert parse_addresses("", 6379) == []


@pytest.mark.parametrize("hosts, says", [
    ("h:port", "bad address 'h:port'"),
    ("h:0", "bad address 'h:0'"),
    ("h:65536", "bad address 'h:65536'"),
    (":7000", "bad address ':7000'"),
    ("[::1", "unclosed '\\['"),
    ("[::1]7000", "bad address"),
    ("[]:7000", "bad address"),
    ("ok:1,h:x", "bad address 'h:x'"),
])
def test_a_bad_address_is_refused_with_what_is_wrong(hosts, says):
    with pytest.raises(AddressError, match=says):
        parse_addresses(hosts, 6379)


def test_the_credentials_are_unquoted_and_split_at_the_last_at_sign():
    assert split_authority("h:1,h:2") == (None, None, "h:1,h:2")
    assert split_authority("app:s%40cret@h:1") == ("app", "s@cret", "h:1")
    assert split_authority(":p@ss@h:1") == (None, "p@ss", "h:1")
    assert split_authority("app@h:1") == ("app", None, "h:1")
    assert split_authority(":@h:1") == (None, "", "h:1")


def test_sentinel_and_cluster_urls_read_their_addresses_alike():
    """One list, each form's own default port; one refusal, each naming its own URL form."""
    hosts = "a:7000,[::1]:7001,b"
    assert parse_sentinel_url(f"redis+sentinel://{hosts}/svc").sentinels == parse_addresses(hosts, 26379)
    assert parse_cluster_url(f"redis+cluster://{hosts}/").nodes == parse_addresses(hosts, 6379)
    with pytest.raises(ConfigurationError, match="bad Sentinel URL .*bad address 'b:99999'"):
        parse_sentinel_url("redis+sentinel://a:1,b:99999/svc")
    with pytest.raises(ConfigurationError, match="bad Redis Cluster URL .*bad address 'b:99999'"):
        parse_cluster_url("redis+cluster://a:1,b:99999/")
