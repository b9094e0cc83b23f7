-- The retention job (coordinator/src/retention.rs) deletes finished sagas
-- older than RETENTION_SECS with their orders, idempotency keys and outbox
-- rows. Only finished sagas are in its index, oldest first.
CREATE INDEX sagas_finished_at ON sagas (finished_at) WHERE finished_at IS NOT NULL;
-- Idempotency keys are deleted with their saga.
CREATE INDEX idempotency_keys_saga_id ON idempotency_keys (saga_id);
