import importlib

Migration = importlib.import_module(
    'tests.models_corners.migrations.0001_initial').Migration
