"""Redis stores: checkpoints, the effect log and run leases on a Redis server.

``RedisStore`` is async (``redis.asyncio``, which runs on **asyncio only**: under trio every
operation raises a StoreError saying so) and ``SyncRedisStore`` is its blocking twin,
generated from it (``scripts/unasync.py``). Both need the optional ``redis`` extra
(``pip install 'stroma[redis]'``); importing this module works without it, constructing a
store does not.

Key layout (all of one run's keys share one prefix, and one Redis Cluster hash slot)::

    {prefix}:run:{<n>:<run id>}:ckpt    hash   node id -> {"schema": "mod:Qual", "data": {...}}
    {prefix}:run:{<n>:<run id>}:log     list   the effect log, one JSON line per item
    {prefix}:run:{<n>:<run id>}:tok     string id of the last append (makes retries idempotent)
    {prefix}:run:{<n>:<run id>}:inputs  hash   input key -> the input's JSON text (put_input)
    {prefix}:run:{<n>:<run id>}:lease   string the holder of the run's lease (own expiry)
    {prefix}:run:{<n>:<run id>}:fence   hash   n: the run's claim counter (the fencing token
                                               of the latest claim), holder: who got it

``<n>`` is the byte length of the UTF-8 run id, so the encoding is injective: no run's keys
are ever another run's keys (run ``a`` vs ``a:b`` vs ``a}:ckpt``), and ``delete`` removes a
fixed set of keys instead of matching a pattern. Every write refreshes the TTL of all of the
run's data keys (ckpt, log, tok, inputs). Each write (``append_log``, ``save``, ``delete``,
``put_input``) is one Lua script (EVALSHA): the log lines, the checkpoint and the append id
land together or not at all. ``put_input`` is the one write that is not fenced: inputs are
not part of the log, and anyone may send a waiting (or running) run its input; it writes
only the ``inputs`` hash.
The lease and fence keys are not part of ``delete``: they belong to the lease's holder and
expire on their own.

**Under faults.**

* A worker that lost its lease (paused past it while another worker took the run over)
  cannot write: while a store object holds a run's lease, every write of that run checks
  the fencing token inside the script, and a stale one is refused with ``LeaseLost`` (a
  RunLocked) before anything is written.
* Transient failures (connection refused/reset, timeouts, a server restarting or loading,
  no pooled connection free within ``pool_timeout``) are retried with tenacity, a bounded
  number of times (``max_attempts``) with jittered exponential waits; a retried write is
  applied once (the script checks the append id). Anything else, or a failure that
  outlasts the retries, is a ``StoreError`` naming the operation, the run and the server:
  no redis exception leaves the store.
* Under load a call waits for a connection of the bounded pool (``max_connections``,
  ``pool_timeout``) instead of failing.
* A run cancelled from outside never leaves its lease behind, a release that fails is
  retried, and a lease this worker left behind is taken over at once (see ``_lease``).
"""

from __future__ import annotations

from interpreters.stores._async_redis import RedisStore
from interpreters.stores._common import RunInfo
from interpreters.stores._lease import LeaseLost
from interpreters.stores._redis_base import _Keys  # noqa: F401  (the key layout, for tests)
from interpreters.stores._sync_redis import SyncRedisStore

__all__ = ("LeaseLost", "RedisStore", "RunInfo", "SyncRedisStore")
