from django.db import models


class Notice(models.Model):
    """A table that exists only from release 3 on."""
    text = models.CharField(max_length=100)
    weight = models.IntegerField(db_default=1)
