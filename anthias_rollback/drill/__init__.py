"""The drill: the rollback rehearsed end to end in a sandbox.

- `run`: run_drill and its steps (PASS, FAIL or ERROR, timed);
- `history`: the drill's result, its JSON report and the history line
  readiness reads back;
- `seeder`: generated rows for any host's models, and the production-like
  writes the drill makes on PostgreSQL.

Callers import the module they need, named for the drill:
`from anthias_rollback.drill import run as drill_run`.
"""
