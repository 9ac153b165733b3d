"""A writer that never stops: `python -m tests.helpers.orm_writer LOG SECONDS`.

Runs in its own process on the `postgres` alias through the ORM, like an
app process left on PostgreSQL, and logs every write the database
acknowledged ('ok <pk> <time>') or refused ('refused <time> <error>'),
one flushed line each, so a test can check them against the restored
SQLite file."""
import os
import sys
import time

import django


def main() -> None:
    log_path, seconds = sys.argv[1], float(sys.argv[2])
    os.environ.setdefault('DJANGO_SETTINGS_MODULE', 'tests.child_settings')
    django.setup()
    from django.db import DatabaseError, connections

    from anthias_app.models import Asset

    ends = time.monotonic() + seconds
    i = 0
    with open(log_path, 'a', buffering=1) as log:
        while time.monotonic() < ends:
            i += 1
            pk = f'w{os.getpid()}-{i}'
            try:
                Asset.objects.using('postgres').create(asset_id=pk, name=pk)
                log.write(f'ok {pk} {time.time():.6f}\n')
            except DatabaseError as err:
                log.write(f'refused {time.time():.6f} '
                          f'{str(err).splitlines()[0]}\n')
                connections['postgres'].close()
                time.sleep(0.01)


if __name__ == '__main__':
    main()
