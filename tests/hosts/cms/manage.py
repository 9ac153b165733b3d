"""The CMS host's manage.py, run as a module from the checkout (as
Anthias runs `python -m anthias_server.manage`):

    python -m tests.hosts.cms.manage migrate --database sqlite
"""
import os
import sys


def main() -> None:
    os.environ.setdefault('DJANGO_SETTINGS_MODULE', 'tests.hosts.cms.settings')
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)


if __name__ == '__main__':
    main()
