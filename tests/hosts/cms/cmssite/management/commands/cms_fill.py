"""Fill the CMS host through the apps' own APIs (on `default`, the
active profile): `--phase before` makes the site, `--phase during` is
what an editor does while the device runs on PostgreSQL."""
import datetime as dt
import decimal
import io
import json

from django.contrib.auth.models import Group, Permission, User
from django.contrib.contenttypes.models import ContentType
from django.core.files.base import ContentFile
from django.core.files.images import ImageFile
from django.core.management.base import BaseCommand
from django.db import connections, transaction
from PIL import Image as PILImage
from wagtail.documents.models import Document
from wagtail.images.models import Image
from wagtail.models import Page, Site

from tests.hosts.cms.cmssite.models import (
    ArticlePage,
    ContactPage,
    EventPage,
    HomePage,
)
from tests.models_corners import models as corners

NUL_BYTES = b'\x00head\x00\xff\xfe tail\x00'
WIDE = decimal.Decimal('12345678901234567890.0123456789')


def png(colour: str) -> ImageFile:
    buffer = io.BytesIO()
    PILImage.new('RGB', (4, 3), colour).save(buffer, 'PNG')
    return ImageFile(buffer, name=f'{colour}.png')


def body(heading: str, image: Image | None = None) -> list:
    blocks = [('heading', heading),
              ('paragraph', (f'<p>About <b>{heading}</b> \u00e9\u00e8 '
                             '\u2603</p>')),
              ('facts', {'label': 'pi', 'value': decimal.Decimal('3.14')})]
    if image is not None:
        blocks.append(('image', image))
    return blocks


class Command(BaseCommand):
    help = 'Fill the CMS host through the apps\' APIs.'

    def add_arguments(self, parser):
        parser.add_argument('--phase', choices=('before', 'during',
                                                'again'), required=True)

    def handle(self, *args, phase, **options):
        with transaction.atomic():
            made = getattr(self, phase)()
        made['vendor'] = connections['default'].vendor
        self.stdout.write(json.dumps(made))

    def before(self) -> dict:
        root = Page.get_first_root_node()
        site = Site.objects.get(is_default_site=True)
        home = HomePage(title='Home', slug='cms-home',
                        intro='<p>Welcome</p>')
        root.add_child(instance=home)
        home.save_revision().publish()
        site.root_page = home
        site.save()
        red = Image.objects.create(title='Red', file=png('red'))
        Image.objects.create(title='Blue', file=png('blue'))
        doc = Document.objects.create(
            title='Leaflet', file=ContentFile(b'leaflet text\n',
                                              name='leaflet.txt'))
        for n in range(6):
            page = ArticlePage(
                title=f'Article {n}', slug=f'article-{n}',
                date=dt.date(2024, 1, 1 + n), hero=red if n % 2 else None,
                attachment=doc if n == 0 else None,
                body=body(f'Article {n}', red if n == 1 else None))
            home.add_child(instance=page)
            page.tags.add(f'tag-{n % 3}', 'news')
            revision = page.save_revision()
            if n < 5:
                revision.publish()
            page.title = f'Article {n} (draft 2)'
            page.save_revision()
        event = EventPage(
            title='Launch', slug='launch', venue='Hall \u00c5',
            starts_at=dt.datetime(2024, 6, 1, 18, 30, tzinfo=dt.UTC),
            body=body('Launch'))
        home.add_child(instance=event)
        event.tags.add('event')
        event.save_revision().publish()
        contact = ContactPage(title='Contact', slug='contact',
                              thank_you_text='<p>Thanks</p>')
        home.add_child(instance=contact)
        contact.form_fields.create(label='Name', field_type='singleline',
                                   required=True)
        contact.form_fields.create(label='Message',
                                   field_type='multiline')
        contact.save_revision().publish()
        self.submit(contact, 'Ann', 'Hello \u00fc')
        editors = Group.objects.create(name='Site editors')
        editors.permissions.add(
            *Permission.objects.filter(codename__in=['access_admin',
                                                     'add_image']))
        for n in range(3):
            user = User.objects.create_user(f'editor{n}',
                                            f'e{n}@example.com', 'pw')
            user.groups.add(editors)
        User.objects.create_superuser('admin', 'admin@example.com', 'pw')
        self.corners()
        return {'pages': Page.objects.count(),
                'images': Image.objects.count()}

    @staticmethod
    def submit(contact: ContactPage, name: str, message: str) -> None:
        form = contact.get_form({'name': name, 'message': message},
                                page=contact, user=None)
        assert form.is_valid(), form.errors
        contact.process_form_submission(form)

    @staticmethod
    def corners() -> None:
        corners.Composite.objects.create(region='eu', number=1,
                                         label='first', blob=NUL_BYTES)
        corners.Composite.objects.create(region='eu', number=2,
                                         label='second')
        corners.Composite.objects.create(region='us', number=1,
                                         label='third \u2603')
        corners.Numbers.objects.create(blob=NUL_BYTES, amount=WIDE,
                                       ratio=0.1)
        corners.Numbers.objects.create(blob=b'', amount=decimal.Decimal(
            '-0.0000000001'))
        top = corners.MixedCase.objects.create(order=10, select='top',
                                               group='g1')
        corners.MixedCase.objects.create(order=11, select='under',
                                         group='g1', parent=top)
        place = corners.Place.objects.create(name='Square')
        place.tags.add('outdoor')
        corners.Restaurant.objects.create(name='Diner', serves_pizza=False,
                                          rating=decimal.Decimal('4.5'))
        pizzeria = corners.Pizzeria.objects.create(
            name='Napoli', serves_pizza=True, oven='wood')
        pizzeria.tags.add('pizza', 'outdoor')
        corners.Remark.objects.create(target=place, text='nice')
        corners.Remark.objects.create(target=pizzeria, text='hot')
        corners.PlaceProxy.objects.filter(pk=place.pk).update(
            notes='via the proxy')
        club = corners.Club.objects.create(name='Chess')
        for name in ('Ann', 'Bob'):
            member = corners.Member.objects.create(name=name)
            corners.Membership.objects.create(club=club, member=member,
                                              since=dt.date(2020, 1, 1))
        hen = corners.Chicken.objects.create(name='Hen')
        egg = corners.Egg.objects.create(layer=hen)
        hen.first_egg = egg
        hen.save()
        corners.Payload.objects.create(data={'a': [1, 2.5, None],
                                             'b': '\u00e9'})
        corners.Payload.objects.create(data=corners.Wrapped([3, 'x']))
        corners.Payload.objects.create(data=None)

    def during(self) -> dict:
        """An editor on PostgreSQL: new and edited pages, revisions,
        tags, a deleted page, a form submission, users; corner rows
        inserted, updated and deleted."""
        home = HomePage.objects.get(slug='cms-home')
        article = ArticlePage.objects.get(slug='article-2')
        article.body = body('Article 2, rewritten on PostgreSQL')
        article.tags.add('rewritten')
        article.save_revision().publish()
        new = ArticlePage(title='Written on PostgreSQL', slug='on-pg',
                          body=body('On PostgreSQL'))
        home.add_child(instance=new)
        new.tags.add('pg')
        new.save_revision().publish()
        Page.objects.get(slug='article-5').delete()
        event = EventPage.objects.get(slug='launch')
        event.venue = 'Hall B'
        event.save_revision().publish()
        self.submit(ContactPage.objects.get(slug='contact'), 'Bob',
                    'From PostgreSQL')
        User.objects.create_user('pg-editor', 'pg@example.com', 'pw')
        User.objects.filter(username='editor0').update(first_name='Zoe')
        Image.objects.create(title='Green', file=png('green'))
        corners.Composite.objects.create(region='us', number=2,
                                         label='on pg', blob=b'\x00')
        corners.Composite.objects.filter(region='eu', number=2).update(
            label='second, edited')
        corners.Composite.objects.filter(region='eu', number=1).delete()
        corners.Numbers.objects.create(blob=b'\x00\x00', amount=WIDE * -1)
        top = corners.MixedCase.objects.get(select='top')
        corners.MixedCase.objects.create(order=12, select='pg',
                                         group='g2', parent=top)
        pizzeria = corners.Pizzeria.objects.get(name='Napoli')
        pizzeria.oven = 'electric'
        pizzeria.name = 'Napoli 2'
        pizzeria.save()
        corners.Remark.objects.create(target=pizzeria, text='from pg')
        corners.Restaurant.objects.filter(name='Diner').delete()
        hen2 = corners.Chicken.objects.create(name='Hen 2')
        egg2 = corners.Egg.objects.create(layer=hen2)
        hen2.first_egg = egg2
        hen2.save()
        corners.Payload.objects.create(data={'pg': True})
        ContentType.objects.get_for_model(corners.Setting)
        return {'pages': Page.objects.count()}

    def again(self) -> dict:
        """A second window's edits: a page moved and retitled, a tag
        removed, rows of every corner shape changed."""
        home = HomePage.objects.get(slug='cms-home')
        article = ArticlePage.objects.get(slug='article-3')
        article.title = 'Article 3, second window'
        article.tags.remove('news')
        article.save_revision().publish()
        event = EventPage.objects.get(slug='launch')
        event.move(ArticlePage.objects.get(slug='on-pg'),
                   pos='last-child')
        late = EventPage(title='Late event', slug='late', venue='Yard',
                         body=body('Late'))
        home.add_child(instance=late)
        late.save_revision().publish()
        corners.Composite.objects.create(region='eu', number=1,
                                         label='back again')
        corners.MixedCase.objects.filter(select='under').update(
            group='moved', order=99)
        corners.Payload.objects.filter(data__isnull=True).update(
            data={'filled': 'later'})
        corners.Egg.objects.create(layer=corners.Chicken.objects.get(
            name='Hen'))
        corners.Member.objects.get(name='Bob').delete()
        return {'pages': Page.objects.count()}
