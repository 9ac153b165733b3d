"""models_corners' migrations in release 3 (MIGRATION_MODULES points
here): the first two are release 1's own, then 0003 adds a column."""
