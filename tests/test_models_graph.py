from django.test import override_settings

from anthias_rollback.models_graph import get_model, plan_models
from tests.kitchensink.models import Category, Item, Person


def position(plan):
    return {label: i for i, label in enumerate(plan.labels)}


def test_foreign_key_targets_come_first_with_auto_m2m_tables():
    plan = plan_models()
    at = position(plan)
    assert at['kitchensink.Category'] < at['kitchensink.Item']
    assert at['kitchensink.Item'] < at['kitchensink.ItemDetail']
    assert at['kitchensink.Item'] < at['kitchensink.Item_tags']
    assert at['kitchensink.Tag'] < at['kitchensink.Item_tags']
    assert at['kitchensink.Person'] < at['kitchensink.Membership']
    assert at['contenttypes.ContentType'] < at['auth.Permission']
    assert 'kitchensink.Item_related' in at
    assert 'anthias_app.Asset' in at


def test_self_references_are_cyclic_fields():
    fields = plan_models().cyclic_fields
    assert Category._meta.get_field('parent') in fields
    assert Person._meta.get_field('mentor') in fields
    assert Item._meta.get_field('category') not in fields


def test_exclude_by_app_or_model_and_setting():
    labels = plan_models(exclude=['kitchensink.Item']).labels
    assert 'kitchensink.Item' not in labels
    # The auto M2M table goes with the model that declares it.
    assert 'kitchensink.Item_tags' not in labels
    assert 'kitchensink.Tag' in labels
    with override_settings(ANTHIAS_ROLLBACK_EXCLUDE='kitchensink admin'):
        labels = plan_models().labels
    assert not [x for x in labels if x.startswith(('kitchensink.',
                                                   'admin.'))]


def test_get_model_finds_auto_created_tables():
    assert get_model('kitchensink.item_tags')._meta.auto_created is Item
