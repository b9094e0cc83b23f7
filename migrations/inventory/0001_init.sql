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

-- initial_available is what the SKU was seeded with: stock is conserved
-- when initial = available + RESERVED quantities.
CREATE TABLE stock (
    sku               text PRIMARY KEY,
    available         bigint NOT NULL CHECK (available >= 0),
    initial_available bigint NOT NULL
);

CREATE TABLE reservations (
    order_id   uuid        NOT NULL,
    saga_id    uuid        NOT NULL,
    sku        text        NOT NULL REFERENCES stock (sku),
    quantity   bigint      NOT NULL CHECK (quantity > 0),
    status     text        NOT NULL CHECK (status IN ('RESERVED', 'RELEASED')),
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (order_id, sku)
);
