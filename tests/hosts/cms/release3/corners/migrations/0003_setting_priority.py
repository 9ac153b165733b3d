"""A column with a default on a table that holds rows: db_default, so a
release-1 process still running during the upgrade can insert."""
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [('models_corners', '0002_settings_seeded')]
    operations = [
        migrations.AddField(
            model_name='setting', name='priority',
            field=models.IntegerField(db_default=0)),
    ]
