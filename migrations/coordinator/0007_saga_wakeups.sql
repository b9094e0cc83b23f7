-- Where the sweeper looks for sagas to wake (step deadlines, ends of
-- backoff), so that it reads the few rows that are due instead of every
-- active saga (the saga row's `wake_at` has no index: see 0006).
--
-- Invariant: every RUNNING or COMPENSATING saga with a `wake_at` has a row
-- here no later than it. A row may be earlier than the saga's deadline:
-- writers do not touch it when a deadline moves later (the common case,
-- one write fewer per step), and the sweeper that finds it early moves it
-- to the saga's deadline. A writer that moves a deadline earlier, or makes
-- a saga active again, lowers the row in the same statement; a saga that
-- ends loses its row in the same statement.
CREATE TABLE saga_wakeups (
    saga_id uuid PRIMARY KEY,
    wake_at timestamptz NOT NULL
);
CREATE INDEX saga_wakeups_wake_at ON saga_wakeups (wake_at);
ALTER TABLE saga_wakeups SET (
    autovacuum_vacuum_scale_factor = 0,
    autovacuum_vacuum_threshold = 2000,
    autovacuum_vacuum_cost_delay = 0
);

INSERT INTO saga_wakeups (saga_id, wake_at)
SELECT id, wake_at FROM sagas
WHERE status IN ('RUNNING', 'COMPENSATING') AND wake_at IS NOT NULL;
