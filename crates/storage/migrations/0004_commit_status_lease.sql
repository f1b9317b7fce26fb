-- One send per (repository, sha, context) at a time. Two workers sending different
-- versions of one status could land at GitHub in either order, and a pending could
-- overwrite a success. A worker claims the row until `sending_until` before its HTTP
-- call; the claim is a column, not a held lock, so no transaction spans the call.
ALTER TABLE commit_statuses ADD COLUMN sending_until timestamptz;
