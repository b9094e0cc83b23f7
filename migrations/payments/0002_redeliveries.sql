-- Redeliveries seen per message: a message redelivered more than
-- MAX_REDELIVERIES times (for instance because it crashes its consumer) is
-- dead-lettered. Only redelivered messages touch this table.
CREATE TABLE redeliveries (
    message_id text PRIMARY KEY,
    count      integer     NOT NULL,
    last_at    timestamptz NOT NULL DEFAULT now()
);
