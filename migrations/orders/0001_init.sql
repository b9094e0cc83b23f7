-- Inbox (barrier): one row per (saga, step, kind), written in the same
-- transaction as the business change. `reply` is the stored reply replayed
-- to duplicates and retries. A compensation that finds no action row inserts
-- the action row itself as a tombstone, so a late action is refused.
CREATE TABLE inbox (
    saga_id      uuid        NOT NULL,
    step         text        NOT NULL,
    kind         text        NOT NULL CHECK (kind IN ('action', 'compensation')),
    attempt      integer     NOT NULL,
    message_type text        NOT NULL,
    tombstone    boolean     NOT NULL DEFAULT false,
    reply        jsonb,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (saga_id, step, kind)
);

-- Transactional outbox of replies (same shape as the coordinator's).
CREATE TABLE outbox (
    id             bigserial PRIMARY KEY,
    message_id     uuid        NOT NULL,
    exchange       text        NOT NULL,
    routing_key    text        NOT NULL,
    message_type   text        NOT NULL,
    correlation_id uuid        NOT NULL,
    headers        jsonb       NOT NULL DEFAULT '{}',
    body           bytea       NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now()
);

-- Orders live in shard tables orders_00 .. orders_NN, created at start from
-- this template (ORDER_SHARDS of them); `order_shards` records the count so
-- that a restart with another count is refused instead of misrouting rows.
CREATE TABLE orders_template (
    id          uuid PRIMARY KEY,
    saga_id     uuid        NOT NULL,
    customer_id text        NOT NULL,
    currency    text        NOT NULL,
    status      text        NOT NULL CHECK (status IN ('PENDING', 'APPROVED', 'CANCELLED')),
    total_cents bigint      NOT NULL,
    items       jsonb       NOT NULL,
    fence       bigint      NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE order_shards (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    shards    integer NOT NULL CHECK (shards BETWEEN 1 AND 100)
);
