"""mypy's proof that both engine modules satisfy `engines.Engine`.

`mypy anthias_rollback` (CI) checks these assignments: a signature that
drifts from the Protocol in either module fails there. Nothing imports
this module (kept apart so the engines package never imports its own
engine modules, which import it).
"""
from anthias_rollback.engines import Engine, postgresql, sqlite

SQLITE: Engine = sqlite
POSTGRESQL: Engine = postgresql
