"""The rollback window: from the cutover to PostgreSQL until the operator
ends it, everything that keeps the way back open.

- `journal`: the change journal's Python side on PostgreSQL (open_window,
  window_state, the write fence, the loss proof, the accounting,
  end_window);
- `cutover`: the cutover record in the data dir (cutover.json: what both
  databases held at the switch);
- `standby`: the standby SQLite file, its cutover file and position;
- `applier`: journal batches applied onto a SQLite file (the replicator's
  and the incremental rollback's);
- `replicator`: replicate_changes' daemon, the standby kept current.

Callers import the room they need, named for the window:
`from anthias_rollback.window import journal as window_journal`.
"""
