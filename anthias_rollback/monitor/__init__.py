"""Watch the app after a cutover and decide when a rollback is due.

Plain parts, each testable alone:

- `rules`: the thresholds, the baseline, what a round found, and the
  decisions: `Evaluator` (the sliding window, the baseline and the
  trigger rules) and `StandbyWatch` (the standby rule: warning-level
  alerts, never a trigger);
- `probes`: `ClientProber` (in-process, Django's test client) and
  `HttpProber` (a running server at a base URL), the URLs a round probes;
- `loop`: `run_monitor()`, the loop bounded by time and probe count, and
  `record_baseline()` / `load_baseline()`: a baseline measured on SQLite.

A round probes the health URL and every ANTHIAS_ROLLBACK_VERIFY_URLS path
once. Nothing here prints or rolls back: monitor_migration owns both.
Callers import the module they need, named for the monitor:
`from anthias_rollback.monitor import rules as monitor_rules`.
"""
