"""ListImages' keyset paging against both real Milvus backends (Milvus Lite and the Milvus
2.3.5 server started by the module fixture): 20,000 rows, pages of 1,000 and 997, rows
enrolled between pages. The rows are written through the adapter (vectors, not
crops: the encoders play no part in listing). Each row present throughout is listed exactly
once, past Milvus' 16,384-row offset window, and the filter holds on every page."""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace

import pytest

from icl.orchestrator.gallery import MilvusGallery
from icl.orchestrator.milvus_server import MilvusServer
from icl.orchestrator.server import PersonSearchService
from icl_api.client import list_images_request
from tests.helpers import gallery_records, start_milvus_server, unit_vectors

DIM = 16
ROWS = 20_000
_names = itertools.count()


@pytest.fixture(scope="module")
def milvus_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MilvusServer]:
    server = start_milvus_server(tmp_path_factory.mktemp("milvus-server"))
    yield server
    server.stop()


@pytest.fixture(scope="module", params=["lite", "server"])
def filled(
    request, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[PersonSearchService, MilvusGallery, list]]:
    """Filled once per backend; the tests only add rows with ids of their own."""
    if request.param == "server":
        uri = request.getfixturevalue("milvus_server").uri
    else:
        uri = str(tmp_path_factory.mktemp("paging") / "gallery.db")
    gallery = MilvusGallery(uri, DIM, f"paging{next(_names)}")
    records = gallery_records(unit_vectors(ROWS, DIM, seed=1))
    for start in range(0, ROWS, 2000):
        gallery.upsert(records[start : start + 2000])
    # Listing needs no encoder: the logic under test is the service's list_images.
    service = PersonSearchService(None, gallery)  # type: ignore[arg-type]
    yield service, gallery, records, ADDED[request.param]
    service.close()
    gallery.close()


_extra = itertools.count()
ADDED: dict[str, list] = {"lite": [], "server": []}  # rows the tests enrolled, per backend


def _page_through(service, gallery, records, added, page_size: int, **filters) -> list[str]:
    """All ids listed, enrolling a row before and one after the cursor between pages."""
    listed: list[str] = []
    token = ""
    extra = _extra
    while True:
        request = list_images_request(page_size, page_token=token, **filters)
        page = asyncio.run(service.list_images(request))
        listed += [i.image_id for i in page.images]
        if not (token := page.next_page_token):
            return listed
        n = next(extra)
        # Concurrent enrolment: one id sorting before every row (behind the cursor) and one
        # after (ahead of it), both matching any filter used here.
        base = records[3003 + 10 * n]  # cam-03, inside the filtered test's time range
        rows = [replace(base, image_id=f"{side}-new-{n:04d}") for side in "az"]
        gallery.upsert(rows)
        added.extend(rows)


def test_paging_lists_each_row_exactly_once_under_enrolment(filled) -> None:
    service, gallery, records, added = filled
    present = {r.image_id for r in added}  # rows enrolled by an earlier test
    listed = _page_through(service, gallery, records, added, 1000)
    counts = Counter(listed)
    assert max(counts.values()) == 1, "a row was listed twice"
    originals = [r.image_id for r in records]
    assert set(originals) <= counts.keys(), "a row was skipped"
    assert listed == sorted(listed), "pages are in image_id order"
    fresh = [i for i in listed if "new" in i and i not in present]
    assert not any(i.startswith("a-new") for i in fresh)  # enrolled behind the cursor
    new_ahead = [i for i in fresh if i.startswith("z-new")]
    assert len(new_ahead) >= ROWS // 1000 - 1  # one per page turned, all listed


def test_filtered_paging_holds_the_filter(filled) -> None:
    service, gallery, records, added = filled
    before = [*records, *added]  # rows present throughout the listing
    start, end = records[3000].captured_at_ms, records[15999].captured_at_ms
    listed = _page_through(
        service,
        gallery,
        records,
        added,
        997,
        camera_ids=["cam-03", "cam-07"],
        start=start,
        end=end,
    )
    expected = sorted(
        r.image_id
        for r in before
        if r.camera_id in ("cam-03", "cam-07") and start <= r.captured_at_ms <= end
    )
    present = {r.image_id for r in before}
    new = [i for i in listed if i not in present]
    assert [i for i in listed if i in present] == expected
    assert len(set(new)) == len(new) and all(i.startswith("z-new") for i in new)
    assert new, "no row enrolled ahead of the cursor matched the filter: vacuous"
    # The stats see every row written, per camera, oldest and newest.
    stats = gallery.stats()
    assert stats.images == gallery.count()
    assert stats.oldest_ms == records[0].captured_at_ms
    assert stats.newest_ms == records[-1].captured_at_ms
    assert sum(stats.per_camera.values()) == stats.images
