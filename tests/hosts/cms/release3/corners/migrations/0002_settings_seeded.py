import importlib

Migration = importlib.import_module(
    'tests.models_corners.migrations.0002_settings_seeded').Migration
