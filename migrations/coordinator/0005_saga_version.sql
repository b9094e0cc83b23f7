-- Every write of a saga bumps its version. Replies are applied without
-- row locks: read, compute, then one statement writes the new state only
-- where the version is still the one read (and the outbox rows of those
-- sagas only); a saga that moved meanwhile is read and computed again.
-- A constant default: no table rewrite.
ALTER TABLE sagas ADD COLUMN version bigint NOT NULL DEFAULT 0;
