"""Anthias's Asset model, field for field (anthias_app/models.py)."""
import uuid

from django.db import models


def generate_asset_id() -> str:
    return uuid.uuid4().hex


class Asset(models.Model):
    asset_id = models.TextField(primary_key=True, default=generate_asset_id,
                                editable=False)
    name = models.TextField(blank=True, null=True)
    uri = models.TextField(blank=True, null=True)
    md5 = models.TextField(blank=True, null=True)
    start_date = models.DateTimeField(blank=True, null=True)
    end_date = models.DateTimeField(blank=True, null=True)
    duration = models.BigIntegerField(blank=True, null=True)
    mimetype = models.TextField(blank=True, null=True)
    is_enabled = models.BooleanField(default=False)
    is_processing = models.BooleanField(default=False)
    nocache = models.BooleanField(default=False)
    play_order = models.IntegerField(default=0)
    skip_asset_check = models.BooleanField(default=False)
    is_reachable = models.BooleanField(default=True)
    last_reachability_check = models.DateTimeField(blank=True, null=True)
    play_days = models.TextField(default='[1, 2, 3, 4, 5, 6, 7]')
    play_time_from = models.TimeField(blank=True, null=True)
    play_time_to = models.TimeField(blank=True, null=True)
    skip_ssl_verify = models.BooleanField(default=False)
    metadata = models.JSONField(default=dict, blank=True)

    class Meta:
        db_table = 'assets'

    def __str__(self) -> str:
        return str(self.name)
