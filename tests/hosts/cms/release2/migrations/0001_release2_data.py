"""The host's second release, shipped while the device runs on
PostgreSQL: a data migration through the default manager."""
from django.db import migrations


def upgrade(apps, schema_editor):
    Setting = apps.get_model('models_corners', 'Setting')
    Setting.objects.create(key='release-2', value='second release')
    Setting.objects.filter(key='seeded-by-0002').update(
        value='first release, upgraded')


class Migration(migrations.Migration):
    dependencies = [('models_corners', '0002_settings_seeded')]
    operations = [migrations.RunPython(upgrade, migrations.RunPython.noop)]
