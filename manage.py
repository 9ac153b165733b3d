#!/usr/bin/env python
"""Reference host project's manage.py (stands in for Anthias's)."""
import os
import sys

if __name__ == '__main__':
    os.environ.setdefault('DJANGO_SETTINGS_MODULE',
                          'settings_profiles.settings')
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
