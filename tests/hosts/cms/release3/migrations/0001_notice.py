from django.db import migrations, models


class Migration(migrations.Migration):
    initial = True
    dependencies = [('models_corners', '0003_setting_priority')]
    operations = [
        migrations.CreateModel(
            name='Notice',
            fields=[
                ('id', models.BigAutoField(auto_created=True,
                                           primary_key=True,
                                           serialize=False,
                                           verbose_name='ID')),
                ('text', models.CharField(max_length=100)),
                ('weight', models.IntegerField(db_default=1)),
            ],
        ),
    ]
