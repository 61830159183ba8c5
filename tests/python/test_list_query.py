"""The list's order and OData options, through the real `openai` client: the classic route
takes `$filter` and `$orderby` as the 2025-04-01-preview spec's list example sends them
(`examples/get_batches.json`) and the batch how-to builds them; v1 has neither; and
`--list-order oldest-first` changes the order of a list that asks for none."""

from __future__ import annotations

import openai
import pytest

from support import chat_file, create


def three_batches(emulator, containers):
    client = emulator.azure()
    url = containers.upload("input.jsonl", chat_file(1))
    return client, [create(client, url, containers.output_url) for _ in range(3)]


def ids(page) -> list[str]:
    return [b.id for b in page.data]


def test_the_classic_list_takes_the_specs_filter(start_emulator, containers):
    client, batches = three_batches(start_emulator(step_ms=60000), containers)
    first, last = min(b.created_at for b in batches), max(b.created_at for b in batches)
    created = [b.id for b in batches]

    def listed(odata_filter: str) -> list[str]:
        query = {"$filter": odata_filter, "$orderby": "created_at asc"}
        return ids(client.batches.list(extra_query=query))

    assert listed(f"created_at ge {first} and created_at le {last}") == created
    assert listed(f"created_at gt {first - 1} and created_at lt {last + 1}") == created
    assert listed(f"created_at lt {first}") == []
    # The docs write the status capitalized; the object has it in lower case.
    assert listed(f"created_at gt {first - 1} and status eq 'Validating'") == created
    client.batches.cancel(created[1])
    assert listed("status eq 'cancelling'") == [created[1]]
    assert listed("status ne 'cancelling'") == [created[0], created[2]]

    for bad in ("created_at gt soon", "created_at gt 5 or status eq 'failed'", "id eq 'x'"):
        with pytest.raises(openai.BadRequestError) as raised:
            client.batches.list(extra_query={"$filter": bad})
        assert raised.value.param == "$filter", bad


def test_a_filtered_list_pages_with_after(start_emulator, containers):
    client, batches = three_batches(start_emulator(step_ms=60000), containers)
    client.batches.cancel(batches[0].id)
    query = {"$filter": "status eq 'validating'", "$orderby": "created_at asc"}
    page = client.batches.list(limit=1, extra_query=query)
    assert ids(page) == [batches[1].id] and page.has_more
    # The client's pager keeps the query and follows `after`.
    assert [b.id for b in client.batches.list(limit=1, extra_query=query)] == [
        batches[1].id,
        batches[2].id,
    ]


def test_v1_has_no_odata_options(start_emulator, containers):
    emulator = start_emulator(step_ms=60000)
    _, batches = three_batches(emulator, containers)
    page = emulator.v1().batches.list(extra_query={"$filter": "created_at lt 0", "$orderby": "created_at asc"})
    assert ids(page) == [b.id for b in batches][::-1], "ignored: newest first, unfiltered"


@pytest.mark.parametrize("style", ["azure", "v1"])
def test_list_order_oldest_first(start_emulator, containers, style):
    emulator = start_emulator("--list-order", "oldest-first", step_ms=60000)
    _, batches = three_batches(emulator, containers)
    created = [b.id for b in batches]
    client = getattr(emulator, style)()
    assert [b.id for b in client.batches.list(limit=2)] == created, "the pager, oldest first"
    if style == "azure":
        newest = client.batches.list(extra_query={"$orderby": "created_at desc"})
        assert ids(newest) == created[::-1], "$orderby still rules"
