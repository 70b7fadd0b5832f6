"""Stores: ``interpreters.stores.file`` (FileStore), ``.redis`` (RedisStore, SyncRedisStore)
and ``.postgres`` (PostgresStore). Import them from their modules; the Redis and PostgreSQL
ones need their optional extras."""

__all__: tuple[str, ...] = ()
