"""What stem reads of a Redis URL itself (``stem.stores.redis_urls``): the authority shared by
the ``redis+sentinel://`` and ``redis+cluster://`` forms (one parser, so both take the same
addresses), what each of those forms adds (a service and db; db 0 only), and the query
options of a plain URL, checked before redis-py sees them."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlsplit

import pytest
import redis

from stem.backends import from_url as backend_from_url
from stem.brokers import from_url as broker_from_url
from stem.config import check_url
from stem.errors import ConfigurationError
from stem.redact import mask_url
from stem.stores.redis_async import AsyncRedisStore
from stem.stores.redis_cluster import parse_cluster_url
from stem.stores.redis_sentinel import parse_sentinel_url
from stem.stores.redis_urls import AddressError, check_plain_options, parse_addresses, split_authority

from .test_cli import invoke


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


# -- what the sentinel and cluster forms add ---------------------------------------------------
def test_a_sentinel_url_names_its_sentinels_service_db_and_passwords():
    u = parse_sentinel_url("redis+sentinel://app:s%40cret@10.0.0.1:26379,[::1]:26380,sentinel-3/orders/2"
                           "?sentinel_password=spw&min_other_sentinels=1")
    assert u.sentinels == [("10.0.0.1", 26379), ("::1", 26380), ("sentinel-3", 26379)]
    assert (u.service_name, u.db, u.username, u.password) == ("orders", 2, "app", "s@cret")
    assert (u.sentinel_password, u.min_other_sentinels, u.ssl) == ("spw", 1, False)
    assert parse_sentinel_url("rediss+sentinel://h:1/svc").ssl is True
    assert parse_sentinel_url("redis+sentinel://h:1/svc").db == 0


def test_a_cluster_url_names_its_nodes_and_password():
    u = parse_cluster_url("redis+cluster://app:s%40cret@10.0.0.1:7000,[::1]:7001,node-3/")
    assert u.nodes == [("10.0.0.1", 7000), ("::1", 7001), ("node-3", 6379)]
    assert (u.username, u.password, u.ssl) == ("app", "s@cret", False)
    assert parse_cluster_url("rediss+cluster://h:1").ssl is True
    assert parse_cluster_url("redis+cluster://h:1/0").nodes == [("h", 1)]


# a bad address is refused alike in both forms (above); these are each form's own refusals
@pytest.mark.parametrize("url, says", [
    ("redis+sentinel:///svc/0", "no sentinel address"),
    ("redis+sentinel://h:26379", "the path must be"),
    ("redis+sentinel://h:26379/svc/0/extra", "the path must be"),
    ("redis+sentinel://h:26379/svc/zero", "db must be a number"),
    ("redis+sentinel://h:1,[::1:2/svc", "IPv6"),
    ("redis+sentinel://h:1/svc?sentinel_pasword=x", "unknown option 'sentinel_pasword'"),
    ("redis+sentinel://h:1/svc?min_other_sentinels=many", "min_other_sentinels must be a number"),
    ("redis+cluster:///", "no node address"),
    ("redis+cluster://h:7000/1", "only db 0"),
    ("redis+cluster://h:7000/0/x", "only db 0"),
    ("redis+cluster://[::1/", "IPv6"),
    ("redis+cluster://h:1/?read_from_replicas=1", "unknown options"),
])
def test_a_bad_sentinel_or_cluster_url_is_refused_before_anything_connects(url, says):
    parse = parse_sentinel_url if "+sentinel:" in url else parse_cluster_url
    for make in (parse, broker_from_url, backend_from_url):
        with pytest.raises(ConfigurationError, match=says):
            make(url)


@pytest.mark.parametrize("url, refused", [
    ("redis+sentinel://:hunter2@h1:26379,h2:26379/svc/0", "redis+sentinel://:hunter2@h1:26379/svc/x"),
    ("redis+cluster://:hunter2@h1:7000,h2:7001/", "redis+cluster://:hunter2@h1:7000/3"),
    ("rediss+cluster://:hunter2@h1:7000/", "rediss+cluster://:hunter2@h1:7000/3"),
])
def test_sentinel_and_cluster_urls_pass_the_config_check_and_their_passwords_are_masked(url, refused):
    assert check_url(url) == url
    assert "hunter2" not in mask_url(url)
    with pytest.raises(ConfigurationError) as err:
        broker_from_url(refused)
    assert "hunter2" not in str(err.value)


# -- the query options of a plain Redis URL -------------------------------------------------
@pytest.mark.parametrize("url, says", [
    ("redis://127.0.0.1:6379/0?namespace=x", "pass namespace= to the broker or backend"),
    ("redis://h/0?socket_timeout=0.1", "stem sets it: pass socket_timeout="),
    ("redis://h/0?retry_on_timeout=yes", "stem sets it"),
    ("redis://h/0?protocol=3", "raw RESP2 replies"),
    ("redis://h/0?decode_responses=true", "raw RESP2 replies"),
    ("redis://h/0?ssl_cert_reqs=none", "a TLS option needs a rediss:// URL"),
    ("unix:///tmp/redis.sock?db=2&nmespace=x", "option 'nmespace': unknown option \\(known: db,"),
    ("rediss://h/0?db=1&typo=1", "option 'typo': unknown option \\(known: .*ssl_cert_reqs"),
])
def test_a_plain_redis_url_with_an_option_stem_does_not_pass_on_is_refused_up_front(url, says):
    """Before, redis-py got every option as a keyword: an unknown one was a TypeError at the
    first command, a known one silently overrode stem's own setting."""
    for make in (broker_from_url, backend_from_url, AsyncRedisStore):
        with pytest.raises(ConfigurationError, match=f"bad Redis URL .*{says}"):
            make(url)


def test_a_refused_option_does_not_show_the_password():
    with pytest.raises(ConfigurationError) as err:
        broker_from_url("redis://:hunter2@h/0?namespace=x&password=hunter3")
    assert "hunter2" not in str(err.value) and "hunter3" not in str(err.value)


@pytest.mark.parametrize("url", [
    "redis://h:6379/0",
    "redis://h/0?db=1&client_name=app&health_check_interval=30&username=u&password=p",
    "unix:///tmp/redis.sock?db=2",
    "rediss://h/0?ssl_cert_reqs=none&ssl_check_hostname=false&ssl_ca_certs=/etc/ca.pem",
])
def test_the_options_stem_passes_on_reach_the_connection(url):
    """Made without connecting: the pool's connection arguments are what redis-py parsed."""
    check_plain_options(url)
    kwargs = redis.ConnectionPool.from_url(url).connection_kwargs
    for name, _ in parse_qsl(urlsplit(url).query):
        assert name in kwargs


@pytest.mark.redis
def test_stem_queues_with_a_namespace_in_the_url_says_how_to_set_it_and_exits_2(redis_url):
    sep = "&" if "?" in redis_url else "?"
    result = invoke("queues", "--broker", f"{redis_url}{sep}namespace=x")
    assert result.exit_code == 2, (result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception
    assert "option 'namespace'" in result.output and "namespace=" in result.output
    assert "Traceback" not in result.output and "TypeError" not in result.output
