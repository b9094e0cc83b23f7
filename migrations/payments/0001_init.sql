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

-- initial_balance_cents is what the account was seeded with: money is
-- conserved when initial = balance + CHARGED payments.
CREATE TABLE accounts (
    customer_id           text PRIMARY KEY,
    balance_cents         bigint NOT NULL CHECK (balance_cents >= 0),
    initial_balance_cents bigint NOT NULL
);

-- One payment per order at most (the primary key): no double charge.
CREATE TABLE payments (
    order_id     uuid PRIMARY KEY,
    saga_id      uuid        NOT NULL,
    customer_id  text        NOT NULL REFERENCES accounts (customer_id),
    amount_cents bigint      NOT NULL CHECK (amount_cents >= 0),
    currency     text        NOT NULL,
    status       text        NOT NULL CHECK (status IN ('CHARGED', 'REFUNDED')),
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now()
);
