-- A saga row (about 2.4 KB once finished) is rewritten at every step.
-- PostgreSQL can do that as a HOT update (the new version on the same page,
-- no index entry written) only when no indexed column changes and the page
-- has room. `wake_at` changes at every step, so its index made every update
-- write a new entry in each of the table's indexes and a new version on
-- another page. The sweeper finds active sagas through `sagas_status_id`
-- instead (status changes only when a saga compensates or ends), and pages
-- are filled to 70% (two rows) so that the next version fits beside them.
-- Measured: 70% keeps 2 finished sagas a page (about 4 KB each); 60% kept
-- one (7.8 KB each) for no gain in latency. Only new pages follow the fill
-- factor: no table rewrite.
DROP INDEX IF EXISTS sagas_wake_active;
ALTER TABLE sagas SET (fillfactor = 70);
