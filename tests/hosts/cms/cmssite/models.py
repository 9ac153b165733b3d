"""The CMS host's page types: wagtail pages are multi-table inheritance
on django-treebeard's MP_Node (Page), two levels deep here (Page ->
ArticlePage -> EventPage); bodies are StreamFields (a JSON field whose
Python value is a StreamValue), tags go through django-taggit and
modelcluster, and a form page keeps its submissions."""
from django.db import models
from modelcluster.contrib.taggit import ClusterTaggableManager
from modelcluster.fields import ParentalKey
from taggit.models import TaggedItemBase
from wagtail import blocks
from wagtail.contrib.forms.models import AbstractForm, AbstractFormField
from wagtail.fields import RichTextField, StreamField
from wagtail.images.blocks import ImageChooserBlock
from wagtail.models import Page


class HomePage(Page):
    intro = RichTextField(blank=True)


class ArticlePageTag(TaggedItemBase):
    content_object = ParentalKey('ArticlePage', on_delete=models.CASCADE,
                                 related_name='tagged_items')


class ArticlePage(Page):
    date = models.DateField(null=True, blank=True)
    hero = models.ForeignKey('wagtailimages.Image', null=True, blank=True,
                             on_delete=models.SET_NULL, related_name='+')
    attachment = models.ForeignKey('wagtaildocs.Document', null=True,
                                   blank=True, on_delete=models.SET_NULL,
                                   related_name='+')
    body = StreamField([
        ('heading', blocks.CharBlock()),
        ('paragraph', blocks.RichTextBlock()),
        ('image', ImageChooserBlock()),
        ('facts', blocks.StructBlock([
            ('label', blocks.CharBlock()),
            ('value', blocks.DecimalBlock()),
        ])),
    ], blank=True)
    tags = ClusterTaggableManager(through=ArticlePageTag, blank=True)


class EventPage(ArticlePage):
    starts_at = models.DateTimeField(null=True, blank=True)
    venue = models.CharField(max_length=100, blank=True)


class ContactFormField(AbstractFormField):
    page = ParentalKey('ContactPage', on_delete=models.CASCADE,
                       related_name='form_fields')


class ContactPage(AbstractForm):
    thank_you_text = RichTextField(blank=True)
