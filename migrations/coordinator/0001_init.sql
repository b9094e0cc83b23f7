-- Coordinator database: saga state, the orders API's view of its requests,
-- idempotency keys, and the transactional outbox of commands.
CREATE TABLE sagas (
    id          uuid PRIMARY KEY,
    saga_type   text        NOT NULL,
    status      text        NOT NULL,
    state       jsonb       NOT NULL,
    payload     jsonb       NOT NULL,
    wake_at     timestamptz,
    created_at  timestamptz NOT NULL,
    updated_at  timestamptz NOT NULL,
    finished_at timestamptz
);
-- Only active sagas are in the sweeper's index: it stays small however many finished sagas are kept.
CREATE INDEX sagas_wake_active ON sagas (wake_at) WHERE status IN ('RUNNING', 'COMPENSATING');
CREATE INDEX sagas_status_id ON sagas (status, id);

CREATE TABLE orders (
    order_id    uuid PRIMARY KEY,
    saga_id     uuid        NOT NULL UNIQUE REFERENCES sagas (id),
    customer_id text        NOT NULL,
    currency    text        NOT NULL,
    total_cents bigint      NOT NULL,
    items       jsonb       NOT NULL,
    created_at  timestamptz NOT NULL
);

CREATE TABLE idempotency_keys (
    key          text PRIMARY KEY,
    request_hash text        NOT NULL,
    order_id     uuid        NOT NULL,
    saga_id      uuid        NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now()
);

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
