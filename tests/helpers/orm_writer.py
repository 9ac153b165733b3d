"""A writer that never stops:
`python -m tests.helpers.orm_writer LOG SECONDS [insert|mix]`.

Runs in its own process on the `postgres` alias through the ORM, like an
app process left on PostgreSQL, and logs every write the database
acknowledged ('ok <pk> <time>') or refused ('refused <time> <error>'),
one flushed line each, so a test can check them against the restored
SQLite file. `mix` also updates and deletes its own earlier rows
('upd <pk> <time>', 'del <pk> <time>'): deletes are what make a
shortfall appear when the accounting reads outside one snapshot."""
import os
import sys
import time

import django


def main() -> None:
    log_path, seconds = sys.argv[1], float(sys.argv[2])
    mix = len(sys.argv) > 3 and sys.argv[3] == 'mix'
    os.environ.setdefault('DJANGO_SETTINGS_MODULE', 'tests.child_settings')
    django.setup()
    from django.db import DatabaseError, connections

    from anthias_app.models import Asset

    ends = time.monotonic() + seconds
    i = 0
    alive: list[str] = []
    with open(log_path, 'a', buffering=1) as log:
        while time.monotonic() < ends:
            i += 1
            pk = f'w{os.getpid()}-{i}'
            try:
                if mix and i % 3 == 1 and alive:
                    gone = alive.pop(0)
                    Asset.objects.using('postgres').filter(
                        pk=gone).delete()
                    log.write(f'del {gone} {time.time():.6f}\n')
                    continue
                if mix and i % 3 == 2 and alive:
                    Asset.objects.using('postgres').filter(
                        pk=alive[-1]).update(name=f'u{i}')
                    log.write(f'upd {alive[-1]} {time.time():.6f}\n')
                    continue
                Asset.objects.using('postgres').create(asset_id=pk, name=pk)
                alive.append(pk)
                log.write(f'ok {pk} {time.time():.6f}\n')
            except DatabaseError as err:
                log.write(f'refused {time.time():.6f} '
                          f'{str(err).splitlines()[0]}\n')
                connections['postgres'].close()
                time.sleep(0.01)


if __name__ == '__main__':
    main()
