-- With ORDERS_DATABASE_URLS the shards are spread over several databases
-- (shard s lives in database s mod n); each records where it stands, so a
-- restart with another list is refused instead of misrouting orders.
ALTER TABLE order_shards ADD COLUMN databases integer NOT NULL DEFAULT 1;
ALTER TABLE order_shards ADD COLUMN database_index integer NOT NULL DEFAULT 0;
