"""Real content through wagtail's own APIs, on whatever `default` is:
run inside a project made by `wagtail start` as
`manage.py shell -c "exec(open(<this file>).read())"` with PHASE set.
Users and groups, a page tree with revisions (published, drafts, a
move, a copy, a delete), a moderation workflow, images with renditions
and tags, documents, form submissions with JSON, a redirect, the site,
and edits of pages an earlier phase made. Prints one JSON line."""
import io
import json
import os

from django.contrib.auth.models import Group, Permission, User
from django.core.files.base import ContentFile
from django.core.files.images import ImageFile
from home.models import HomePage
from PIL import Image as PILImage
from wagtail.contrib.forms.models import FormSubmission
from wagtail.contrib.redirects.models import Redirect
from wagtail.documents.models import Document
from wagtail.images.models import Image
from wagtail.models import (
    Collection,
    GroupPagePermission,
    Page,
    Site,
    Workflow,
)

phase = os.environ['PHASE']
home = HomePage.objects.get(depth=2)
boss = User.objects.create_superuser(f'{phase}-admin', f'{phase}@example.org',
                                     'pw')
editors, _ = Group.objects.get_or_create(name=f'editors {phase}')
editors.permissions.add(*Permission.objects.filter(
    codename__in=['access_admin', 'add_image', 'change_document']))
users = [boss]
for i in range(3):
    user = User.objects.create_user(f'{phase}-editor{i}', password='pw',
                                    first_name=f'Édith {i}')
    user.groups.add(editors)
    users.append(user)
section = home.add_child(instance=HomePage(title=f'Section {phase}',
                                           slug=f'section-{phase}'))
GroupPagePermission.objects.create(
    group=editors, page=section,
    permission=Permission.objects.get(codename='change_page'))
pages = []
for i in range(8):
    page = section.add_child(instance=HomePage(
        title=f'{phase} page {i} — ünïcode ✓', slug=f'{phase}-page-{i}',
        search_description='x' * (i * 37), live=False))
    revision = page.save_revision(user=users[i % 4], log_action=True)
    if i % 3:
        revision.publish(user=boss)
    for k in range(i % 3):
        page.title = f'{phase} page {i} draft {k}'
        page.save_revision(user=users[1], log_action=True)
    pages.append(page)
pages[1].move(pages[2], pos='last-child', user=boss)
pages[3].specific.copy(to=section, user=boss, update_attrs={
    'title': f'{phase} copy', 'slug': f'{phase}-copy'})
Page.objects.get(pk=pages[4].pk).delete()
workflow = Workflow.objects.first()
if workflow is not None:
    page = Page.objects.get(pk=pages[5].pk).specific
    page.save_revision(user=users[2])
    workflow.start(page, users[2])
collection = Collection.get_first_root_node().add_child(name=f'Media {phase}')
for i in range(3):
    buf = io.BytesIO()
    PILImage.new('RGB', (20 + i, 10 + i), (i * 40, 100, 200)).save(buf,
                                                                    'PNG')
    image = Image.objects.create(
        title=f'{phase} image {i}', collection=collection,
        file=ImageFile(buf, name=f'{phase}-{i}.png'), uploaded_by_user=boss)
    image.tags.add(f'tag {i % 2}', phase)
    image.get_rendition('fill-10x10')
    doc = Document.objects.create(
        title=f'{phase} doc {i}', collection=collection,
        file=ContentFile(b'%PDF-1.4 \x00\x01' * (i + 1),
                         name=f'{phase}-{i}.pdf'))
    doc.tags.add('docs', phase)
for i in range(6):
    FormSubmission.objects.create(page=pages[i % 3 + 5], form_data={
        'name': f'visitor {i}', 'n': i, 'nested': {'a': [1, 2, None]},
        'text': 'quote " and \\ backslash'})
Redirect.add_redirect(f'/old-{phase}', redirect_to=pages[0])
site = Site.objects.get(is_default_site=True)
site.site_name = f'site after {phase}'
site.save()
for page in HomePage.objects.exclude(slug__startswith=phase).filter(
        depth=4)[:3]:
    page.title = f'{page.title} (edited in {phase})'
    page.save_revision(user=users[3]).publish(user=boss)
print(json.dumps({'pages': Page.objects.count(),
                  'images': Image.objects.count()}))
