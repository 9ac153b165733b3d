"""An app process that keeps writing through the ORM on `default` (the
active profile) until --stop-file appears: creates, updates and deletes
models_corners.Setting rows, and on release 3 also sets the new column
and creates rows of the new model. Each write is its own transaction
(acknowledged when the call returns). Prints one JSON line at the end:
how many writes were acknowledged, and the first error if one stopped
it (a fenced PostgreSQL, say)."""
import json
import os
import time
from pathlib import Path

from django.core.management.base import BaseCommand
from django.db import DatabaseError

from tests.models_corners.models import Setting


class Command(BaseCommand):
    help = 'Write through the ORM until --stop-file exists.'

    def add_arguments(self, parser):
        parser.add_argument('--tag', required=True)
        parser.add_argument('--stop-file', type=Path, required=True)
        parser.add_argument('--max-seconds', type=float, default=120.0)

    def handle(self, *args, tag, stop_file, max_seconds, **options):
        release3 = os.environ.get('CMS_HOST_RELEASE') == '3'
        if release3:
            from tests.hosts.cms.release3.models import Notice
        done, error = 0, None
        deadline = time.monotonic() + max_seconds
        n = 0
        while not stop_file.exists() and time.monotonic() < deadline:
            n += 1
            try:
                row = Setting.objects.create(key=f'{tag}-{n}',
                                             value=f'v{n}')
                done += 1
                if n % 3 == 0:
                    Setting.objects.filter(key=f'{tag}-{n - 1}').update(
                        value=f'v{n - 1} updated')
                    done += 1
                if n % 5 == 0:
                    Setting.objects.filter(key=f'{tag}-{n - 2}').delete()
                    done += 1
                if release3:
                    row.priority = n
                    row.save(update_fields=['priority'])
                    Notice.objects.create(text=f'{tag} notice {n}')
                    done += 2
            except DatabaseError as err:
                error = str(err).splitlines()[0]
                break
            time.sleep(0.01)
        self.stdout.write(json.dumps({'acknowledged': done,
                                      'rounds': n, 'error': error}))
