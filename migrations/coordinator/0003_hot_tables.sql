-- A saga row is rewritten at every transition. Keep it inline and
-- uncompressed up to a full page: compressing its ~2 KB of state at every
-- update cost more CPU than the smaller row saved.
ALTER TABLE sagas SET (toast_tuple_target = 8160);

-- The outbox is a queue whose rows live for milliseconds: vacuum it often,
-- so that the relay's scan in id order does not wade through dead tuples.
ALTER TABLE outbox SET (
    autovacuum_vacuum_scale_factor = 0,
    autovacuum_vacuum_threshold = 2000,
    autovacuum_vacuum_cost_delay = 0
);
