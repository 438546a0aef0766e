"""Where brokers and result backends keep their data: the plumbing of each store, in one place.

    base.py              Store (what a broker can share with a backend), StoreErrors, Backoff
    local.py             connections per thread and process; the one fork hook of the stores
    redis.py             RedisStore: one pool per URL, bounded retries, Lua scripts, errors translated
    redis_pipe.py        the lean Redis pipeline of the hot paths (packed in C, replies read raw)
    redis_sentinel.py    redis+sentinel:// URLs: the pool of the master the sentinels name
    redis_cluster.py     redis+cluster:// URLs: the cluster client, pipelines split by slot
    sqlite.py            SqliteStore: connections per thread, WAL, busy timeout, errors translated
    sqlite_schema.py     SQLite tables and their migrations
    postgres.py          PostgresStore: durable and fast sessions, reconnects, errors translated
    postgres_schema.py   Postgres tables, notification channels and their migrations
    postgres_listen.py   the LISTEN thread

A broker and a backend only hold their store and speak their own queries or
commands through it; every third-party error (redis-py, sqlite3, psycopg)
leaves a store as a ``StemError`` (``BrokerError``/``BackendError``, or their
``...ConnectionError`` once the store could not be reached after bounded
retries).  A broker exposes its store as ``broker.store``, so a backend in the
same store (``ResultBackend.shares_store_with``) can store results and ack in
one round trip or transaction.

Nothing here is imported by ``import stem``: each store module needs its
driver (redis-py, psycopg) only when an adapter of that store is used.
"""
