"""Message batches in the state store, against both engines: the records and their list, the
queue of items under leases, cancel, the sweep's expiry and archiving, and batch items' slots
on a backend beside the placement's interactive flights. Every time is an explicit ``now``, so
nothing sleeps: a slot's lease runs on the store's clock, so a lease already run out stands
for a runner that died."""

from __future__ import annotations

import os
import threading
import time

from app.state.batch_queue import (
    ARCHIVED_AFTER,
    CANCELING,
    ENDED,
    ERRORED,
    EXPIRES_AFTER,
    IN_PROGRESS,
    SUCCEEDED,
    BatchRecord,
    Claim,
)
from app.state.redis_store import RedisStore
from app.state.sqlite_store import SQLiteStore
from app.state.store import Store

NOW = 1_800_000_000.0
LEASE = 60.0


def batch_id(n: int) -> str:
    """Ids as the gateway makes them: they sort by creation."""
    return f"msgbatch_01{1_700_000_000_000 + n:012x}{n * 7919:012x}"


def new_batch(store: Store, n: int, total: int, owner: str = "k1", at: float = NOW) -> str:
    store.batch_create(BatchRecord(batch_id(n), owner, total, at, at + EXPIRES_AFTER))
    return batch_id(n)


def items(claims: list[Claim]) -> list[tuple[str, int, int]]:
    return [(c.batch_id, c.index, c.attempts) for c in claims]


def record(store: Store, batch: str) -> BatchRecord:
    found = store.batch_get(batch)
    assert found is not None
    return found


# --- records and the list -------------------------------------------------------------------


def test_a_new_batch_is_kept_whole_with_every_item_waiting(store):
    kept = BatchRecord(batch_id(1), "k1", 100_000, NOW + 0.123456, NOW + 0.123456 + EXPIRES_AFTER)
    store.batch_create(kept)
    assert store.batch_get(batch_id(1)) == kept
    assert (kept.status, kept.next, kept.running, kept.ended_at) == (IN_PROGRESS, 0, 0, None)
    assert store.batch_get(batch_id(2)) is None


def test_the_list_is_newest_first_and_pages_both_ways(store):
    ids = [new_batch(store, n, 1, at=NOW + n) for n in range(5)]

    def page(before: str | None = None, after: str | None = None) -> tuple[list[str], bool]:
        found = store.batch_list(None, 2, before, after)
        return [r.id for r in found.records], found.has_more

    assert page() == ([ids[4], ids[3]], True)
    assert page(after=ids[3]) == ([ids[2], ids[1]], True)
    assert page(after=ids[1]) == ([ids[0]], False)
    assert page(after=ids[0]) == ([], False)
    assert page(before=ids[0]) == ([ids[2], ids[1]], True)  # the two just newer, newest first
    assert page(before=ids[2]) == ([ids[4], ids[3]], False)
    assert page(before=ids[4]) == ([], False)
    everything = store.batch_list(None, 1000, None, None)
    assert [r.id for r in everything.records] == ids[::-1] and not everything.has_more
    assert everything.records[0] == record(store, ids[4])


def test_a_key_lists_only_its_own_batches(store):
    ids = [new_batch(store, n, 1, owner=f"k{n % 2}") for n in range(5)]
    mine = store.batch_list("k1", 10, None, None)
    assert [r.id for r in mine.records] == [ids[3], ids[1]]
    assert [r.id for r in store.batch_list("k0", 1, None, ids[4]).records] == [ids[2]]
    assert store.batch_list("k0", 1, None, ids[4]).has_more
    assert [r.id for r in store.batch_list("k0", 5, ids[0], None).records] == [ids[4], ids[2]]
    assert store.batch_list("nobody", 5, None, None).records == []
    assert len(store.batch_list(None, 10, None, None).records) == 5


# --- the queue ------------------------------------------------------------------------------


def test_claims_take_the_oldest_batch_first_then_newer_ones(store):
    old = new_batch(store, 1, 2)
    new = new_batch(store, 2, 3, at=NOW + 1)
    claims = store.batch_claim("a", NOW + 2, LEASE, 4)
    assert items(claims) == [(old, 0, 0), (old, 1, 0), (new, 0, 0), (new, 1, 0)]
    assert (record(store, old).next, record(store, old).running) == (2, 2)
    assert (record(store, new).next, record(store, new).running) == (2, 2)
    assert items(store.batch_claim("b", NOW + 3, LEASE, 4)) == [(new, 2, 0)]
    assert store.batch_claim("b", NOW + 3, LEASE, 4) == []


def test_items_due_again_come_before_fresh_ones_and_a_lost_runner_counts_an_attempt(store):
    batch = new_batch(store, 1, 5)
    first = store.batch_claim("a", NOW, 10.0, 2)  # items 0 and 1, until NOW + 10
    assert items(first) == [(batch, 0, 0), (batch, 1, 0)]
    store.batch_release("a", first[0], NOW + 5)  # item 0: tried again from NOW + 5
    assert record(store, batch).running == 1
    assert items(store.batch_claim("b", NOW + 4, 10.0, 1)) == [(batch, 2, 0)]  # 0 not yet due
    assert items(store.batch_claim("b", NOW + 6, 10.0, 2)) == [(batch, 0, 1), (batch, 3, 0)]
    assert record(store, batch).running == 4
    # a's lease on item 1 ran out at NOW + 10: its runner is gone, and that attempt counts.
    assert items(store.batch_claim("c", NOW + 11, 10.0, 2)) == [(batch, 1, 1), (batch, 4, 0)]
    found = record(store, batch)
    assert (found.next, found.running) == (5, 5)


def test_a_renewal_extends_only_the_tokens_own_leases(store):
    batch = new_batch(store, 1, 2)
    claims = store.batch_claim("a", NOW, 10.0, 2)
    store.batch_renew("b", claims, NOW + 5, 100.0)  # not b's: nothing
    store.batch_renew("a", claims[:1], NOW + 5, 10.0)  # item 0 now until NOW + 15
    assert items(store.batch_claim("c", NOW + 12, 10.0, 5)) == [(batch, 1, 1)]
    store.batch_renew("a", claims, NOW + 13, 10.0)  # item 1 is c's now: only item 0 renewed
    assert store.batch_claim("d", NOW + 20, 10.0, 5) == []
    # Due the longest first: c's lease ran out at NOW + 22, a's at NOW + 23.
    assert items(store.batch_claim("d", NOW + 23, 10.0, 5)) == [(batch, 1, 2), (batch, 0, 1)]


def test_a_released_item_is_due_at_not_before_with_one_attempt_more(store):
    batch = new_batch(store, 1, 1)
    (claim,) = store.batch_claim("a", NOW, LEASE, 1)
    store.batch_release("b", claim, NOW + 1)  # not b's to give back
    assert record(store, batch).running == 1
    store.batch_release("a", claim, NOW + 30)
    assert record(store, batch).running == 0
    store.batch_release("a", claim, NOW + 1)  # given back already
    assert store.batch_claim("b", NOW + 29, LEASE, 1) == []
    (again,) = store.batch_claim("b", NOW + 30, LEASE, 1)
    assert (again.index, again.attempts) == (0, 1)
    store.batch_release("b", again, NOW + 40)
    assert store.batch_claim("c", NOW + 40, LEASE, 1)[0].attempts == 2


def test_an_item_given_back_unsent_counts_no_attempt(store):
    new_batch(store, 1, 1)
    (claim,) = store.batch_claim("a", NOW, LEASE, 1)
    store.batch_release("a", claim, NOW + 5, NOW, attempt=False)  # a key's passing limit
    (again,) = store.batch_claim("b", NOW + 5, LEASE, 1)
    assert again.attempts == 0


def test_an_item_is_counted_once_and_the_last_one_ends_the_batch(store):
    batch = new_batch(store, 1, 2)
    first, second = store.batch_claim("a", NOW, LEASE, 2)
    after = store.batch_finish(first, SUCCEEDED, NOW + 1)
    assert after is not None and (after.succeeded, after.running, after.status) == (
        1,
        1,
        IN_PROGRESS,
    )
    assert store.batch_finish(first, ERRORED, NOW + 2) is None  # a second run of it
    assert (record(store, batch).succeeded, record(store, batch).errored) == (1, 0)
    last = store.batch_finish(second, ERRORED, NOW + 3)
    assert last is not None
    assert (last.status, last.ended_at, last.succeeded, last.errored) == (ENDED, NOW + 3, 1, 1)
    assert (last.canceled, last.expired, last.running) == (0, 0, 0)
    assert record(store, batch) == last
    assert store.batch_finish(second, SUCCEEDED, NOW + 4) is None
    store.batch_release("a", second, NOW + 5)  # too late: nothing
    assert record(store, batch) == last
    assert store.batch_claim("b", NOW + 6, LEASE, 5) == []


def test_a_finish_by_a_runner_whose_item_was_taken_again_counts_once(store):
    batch = new_batch(store, 1, 2)
    (lost,) = store.batch_claim("a", NOW, 10.0, 1)
    (taken,) = store.batch_claim("b", NOW + 11, 10.0, 1)
    assert (taken.index, taken.attempts) == (0, 1)
    assert store.batch_finish(lost, SUCCEEDED, NOW + 12) is not None  # the slow first run
    assert store.batch_finish(taken, SUCCEEDED, NOW + 13) is None
    found = record(store, batch)
    assert (found.succeeded, found.running, found.status) == (1, 0, IN_PROGRESS)


# --- cancel ---------------------------------------------------------------------------------


def test_a_canceled_batch_hands_out_nothing_and_ends_when_its_running_items_finish(store):
    batch = new_batch(store, 1, 5)
    running, waiting = store.batch_claim("a", NOW, LEASE, 2)
    store.batch_release("a", waiting, NOW + 1)  # given back: it will not be tried again
    canceled = store.batch_cancel(batch, NOW + 2)
    assert canceled is not None
    assert (canceled.status, canceled.cancel_initiated_at, canceled.running) == (
        CANCELING,
        NOW + 2,
        1,
    )
    assert store.batch_claim("b", NOW + 3, LEASE, 5) == []
    assert store.batch_cancel(batch, NOW + 4) == record(store, batch)  # no change
    assert record(store, batch).cancel_initiated_at == NOW + 2
    done = store.batch_finish(running, SUCCEEDED, NOW + 5)
    assert done is not None
    assert (done.status, done.ended_at, done.succeeded, done.canceled, done.expired) == (
        ENDED,
        NOW + 5,
        1,
        4,
        0,
    )
    assert store.batch_cancel(batch, NOW + 6) == done  # an ended batch stays as it is


def test_a_batch_canceled_with_nothing_running_ends_at_once(store):
    batch = new_batch(store, 1, 3)
    first, _ = store.batch_claim("a", NOW, LEASE, 2)
    store.batch_finish(first, ERRORED, NOW + 1)
    store.batch_release("a", _, NOW + 10)
    ended = store.batch_cancel(batch, NOW + 2)
    assert ended is not None
    assert (ended.status, ended.ended_at, ended.errored, ended.canceled, ended.expired) == (
        ENDED,
        NOW + 2,
        1,
        2,
        0,
    )
    assert store.batch_claim("a", NOW + 20, LEASE, 5) == []
    assert store.batch_cancel(batch_id(9), NOW) is None


def test_giving_back_the_last_running_item_of_a_canceling_batch_ends_it(store):
    batch = new_batch(store, 1, 3)
    first, second = store.batch_claim("a", NOW, LEASE, 2)
    store.batch_cancel(batch, NOW + 1)
    store.batch_release("a", first, NOW + 30, now=NOW + 2)
    assert record(store, batch).status == CANCELING
    store.batch_release("a", second, NOW + 30, now=NOW + 3)
    found = record(store, batch)
    # It ends when it was given back, not when it would have been tried again.
    assert (found.status, found.ended_at, found.canceled, found.running) == (ENDED, NOW + 3, 3, 0)


# --- the sweep ------------------------------------------------------------------------------


def test_a_batch_past_its_expiry_ends_with_its_unfinished_items_expired(store):
    batch = new_batch(store, 1, 3)
    first, second = store.batch_claim("a", NOW, LEASE, 2)
    store.batch_finish(first, SUCCEEDED, NOW + 1)
    end = NOW + EXPIRES_AFTER
    assert store.batch_sweep(end - 1) == []
    assert record(store, batch).status == IN_PROGRESS
    assert store.batch_claim("b", end, LEASE, 5) == []  # nothing is handed out past it
    assert store.batch_sweep(end) == []
    found = record(store, batch)
    assert (found.status, found.ended_at, found.succeeded, found.expired, found.canceled) == (
        ENDED,
        end,
        1,
        2,
        0,
    )
    assert store.batch_finish(second, SUCCEEDED, end + 1) is None  # too late
    assert record(store, batch) == found
    assert store.batch_done(batch, 0, 3) == [0]


def test_a_canceling_batch_whose_runners_are_gone_ends(store):
    batch = new_batch(store, 1, 4)
    first, second = store.batch_claim("a", NOW, 10.0, 2)
    store.batch_cancel(batch, NOW + 1)
    store.batch_renew("a", [second], NOW + 5, 10.0)  # second until NOW + 15
    store.batch_sweep(NOW + 9)
    assert record(store, batch).status == CANCELING
    store.batch_sweep(NOW + 11)  # first's runner is gone
    assert (record(store, batch).status, record(store, batch).running) == (CANCELING, 1)
    assert store.batch_finish(first, SUCCEEDED, NOW + 12) is not None  # late, but counted
    assert record(store, batch).status == CANCELING
    store.batch_sweep(NOW + 16)
    found = record(store, batch)
    assert (found.status, found.ended_at, found.succeeded, found.canceled) == (
        ENDED,
        NOW + 16,
        1,
        3,
    )


def test_an_ended_batch_is_archived_29_days_after_its_creation(store):
    batch = new_batch(store, 1, 2)
    other = new_batch(store, 2, 1, at=NOW + 10)
    store.batch_finish(store.batch_claim("a", NOW, LEASE, 1)[0], SUCCEEDED, NOW + 1)
    assert store.batch_done(batch, 0, 2) == [0]
    assert store.batch_sweep(NOW + ARCHIVED_AFTER - 1) == []  # expired meanwhile, kept
    assert record(store, batch).status == ENDED and record(store, batch).archived_at is None
    assert store.batch_done(batch, 0, 2) == [0]
    assert store.batch_sweep(NOW + ARCHIVED_AFTER) == [batch]
    found = record(store, batch)
    assert (found.archived_at, found.succeeded, found.expired) == (NOW + ARCHIVED_AFTER, 1, 1)
    assert store.batch_done(batch, 0, 2) == []
    assert store.batch_sweep(NOW + ARCHIVED_AFTER + 5) == []
    assert store.batch_sweep(NOW + ARCHIVED_AFTER + 10) == [other]
    assert [r.id for r in store.batch_list(None, 5, None, None).records] == [other, batch]
    assert store.batch_delete(batch)  # an archived batch is still an ended one


def test_a_batch_created_29_days_ago_and_never_swept_ends_and_is_archived_at_once(store):
    batch = new_batch(store, 1, 2)
    assert store.batch_sweep(NOW + ARCHIVED_AFTER) == [batch]
    found = record(store, batch)
    assert (found.status, found.expired, found.archived_at) == (ENDED, 2, NOW + ARCHIVED_AFTER)


# --- delete and the done items --------------------------------------------------------------


def test_only_an_ended_batch_is_deleted(store):
    batch = new_batch(store, 1, 2, owner="k1")
    assert store.batch_delete(batch) is False
    assert record(store, batch).status == IN_PROGRESS
    store.batch_claim("a", NOW, LEASE, 1)
    store.batch_cancel(batch, NOW + 1)
    assert store.batch_delete(batch) is False  # canceling: an item still runs
    store.batch_sweep(NOW + LEASE + 1)
    assert store.batch_delete(batch) is True
    assert store.batch_get(batch) is None
    assert store.batch_list(None, 5, None, None).records == []
    assert store.batch_list("k1", 5, None, None).records == []
    assert store.batch_delete(batch) is False
    assert store.batch_delete(batch_id(9)) is False


def test_a_deleted_batch_leaves_no_done_items_behind(store):
    batch = new_batch(store, 1, 2)
    first, second = store.batch_claim("a", NOW, LEASE, 2)
    store.batch_finish(first, SUCCEEDED, NOW + 1)
    store.batch_finish(second, SUCCEEDED, NOW + 2)
    assert store.batch_done(batch, 0, 2) == [0, 1]
    assert store.batch_delete(batch)
    assert store.batch_done(batch, 0, 2) == []


def test_the_done_items_are_read_by_range(store):
    batch = new_batch(store, 1, 1000)
    claims = store.batch_claim("a", NOW, LEASE, 1000)
    assert len(claims) == 1000
    finished = [0, 3, 7, 8, 9, 15, 16, 500, 998, 999]
    for index in finished:
        store.batch_finish(claims[index], SUCCEEDED, NOW + 1)
    assert store.batch_done(batch, 0, 1000) == finished
    assert store.batch_done(batch, 3, 9) == [3, 7, 8]
    assert store.batch_done(batch, 8, 17) == [8, 9, 15, 16]
    assert store.batch_done(batch, 10, 15) == []
    assert store.batch_done(batch, 999, 1000) == [999]
    assert store.batch_done(batch, 5, 5) == []
    assert store.batch_done(batch, 990, 2000) == [998, 999]
    assert store.batch_done(batch_id(9), 0, 10) == []


# --- slots on a backend ---------------------------------------------------------------------


def test_batch_slots_stay_within_their_share(store):
    first = store.batch_slot("a", 10, 2, LEASE)
    second = store.batch_slot("a", 10, 2, LEASE)
    assert first and second and first != second
    assert store.batch_slot("a", 10, 2, LEASE) is None
    assert store.batch_slot("b", 10, 2, LEASE) is not None  # another backend's share
    store.batch_unslot("a", first)
    assert store.batch_slot("a", 10, 2, LEASE) is not None
    assert store.batch_slot("a", 10, 2, LEASE) is None


def test_the_workers_published_requests_in_flight_take_room_from_batch_items(store):
    store.publish_loads("w1", {"a": 1, "b": 0}, LEASE)
    store.publish_loads("w2", {"a": 1, "b": 3}, LEASE)  # two workers' interactive requests
    assert store.batch_slot("a", 3, 3, LEASE) is not None  # 2 interactive + 1 = capacity
    assert store.batch_slot("a", 3, 3, LEASE) is None
    assert store.batch_slot("b", 3, 3, LEASE) is None  # b is full of w2's requests
    assert store.backend_loads(["a"]) == {"a": 0}  # batch items are not interactive load
    store.publish_loads("w1", {"a": 0, "b": 0}, LEASE)  # a worker's next word replaces its last
    assert store.batch_slot("a", 3, 3, LEASE) is not None


def test_a_batch_slot_whose_lease_ran_out_is_not_counted_nor_a_dead_workers_load(store):
    assert store.batch_slot("a", 5, 1, -1.0) is not None  # its runner died long ago
    assert store.batch_slot("a", 5, 1, LEASE) is not None
    assert store.batch_slot("a", 5, 1, LEASE) is None
    store.publish_loads("gone", {"a": 4}, -1.0)  # a worker that stopped publishing
    assert store.batch_slot("a", 2, 2, LEASE) is not None


def test_a_renewed_slot_runs_on_from_now_and_a_slot_gone_is_not_renewed(store):
    first = store.batch_slot("a", 10, 2, LEASE)
    second = store.batch_slot("a", 10, 2, LEASE)
    assert first is not None and second is not None
    store.batch_reslot("a", [first, second], LEASE)
    assert store.batch_slot("a", 10, 2, LEASE) is None  # both still counted
    store.batch_reslot("a", [first], -1.0)  # renewed to a lease already over: first is gone
    third = store.batch_slot("a", 10, 2, LEASE)
    assert third is not None
    store.batch_unslot("a", third)
    store.batch_unslot("a", second)
    store.batch_reslot("a", [first, second], LEASE)  # run out, given back: neither comes back
    assert store.batch_slot("a", 10, 2, LEASE) is not None
    assert store.batch_slot("a", 10, 2, LEASE) is not None


def test_a_canceling_batch_past_its_expiry_ends_with_its_unfinished_items_canceled(store):
    batch = new_batch(store, 1, 3)
    store.batch_claim("a", NOW, EXPIRES_AFTER * 2, 1)
    store.batch_cancel(batch, NOW + 1)
    store.batch_sweep(NOW + EXPIRES_AFTER)
    found = record(store, batch)
    assert (found.status, found.canceled, found.expired) == (ENDED, 3, 0)


def test_a_batch_past_its_expiry_is_passed_over_before_the_sweep_ends_it(store):
    new_batch(store, 1, 5, at=NOW - EXPIRES_AFTER)
    newer = new_batch(store, 2, 5, at=NOW - 10)
    assert items(store.batch_claim("a", NOW, LEASE, 2)) == [(newer, 0, 0), (newer, 1, 0)]


def test_giving_back_the_last_running_item_without_a_time_ends_the_batch_by_the_stores_clock(
    store,
):
    batch = new_batch(store, 1, 2, at=time.time())
    (claim,) = store.batch_claim("a", time.time(), LEASE, 1)
    store.batch_cancel(batch, time.time())
    before = time.time()
    store.batch_release("a", claim, before + 30)
    found = record(store, batch)
    assert found.status == ENDED and found.ended_at is not None
    assert before - 1 < found.ended_at < time.time() + 1  # not the retry time


def test_redis_keeps_no_item_until_it_is_handed_out_and_nothing_of_a_deleted_batch(
    redis_server,
):
    prefix = f"test:{time.monotonic_ns()}:"
    store = RedisStore(redis_server.url, prefix=prefix)
    try:
        batch = new_batch(store, 1, 100_000)
        keys = {k.decode().removeprefix(prefix) for k in store.redis.keys(prefix + "*")}
        assert keys == {
            f"batch:{batch}",
            "batches",
            "batches:owner:k1",
            "batches:open",
            "batches:expiry",
        }
        first, second = store.batch_claim("a", NOW, LEASE, 2)
        assert store.redis.zcard(f"{prefix}batch:{batch}:claims") == 2
        store.batch_finish(first, SUCCEEDED, NOW + 1)
        assert store.redis.zcard(f"{prefix}batch:{batch}:claims") == 1
        store.batch_cancel(batch, NOW + 2)
        store.batch_finish(second, SUCCEEDED, NOW + 3)  # the batch ends
        keys = {k.decode().removeprefix(prefix) for k in store.redis.keys(prefix + "*")}
        assert keys == {
            f"batch:{batch}",
            f"batch:{batch}:done",  # the results reader's, until delete or archive
            "batches",
            "batches:owner:k1",
            "batches:ended",
        }
        assert store.batch_delete(batch)
        assert store.redis.keys(prefix + "*") == []
    finally:
        store.close()


def test_an_item_given_back_before_the_cancel_is_not_taken_for_a_lost_runner(store):
    batch = new_batch(store, 1, 3)
    running, waiting = store.batch_claim("a", NOW, LEASE, 2)
    store.batch_release("a", waiting, NOW + 1)
    store.batch_cancel(batch, NOW + 2)
    store.batch_sweep(NOW + 3)  # past the retry time, within the running item's lease
    found = record(store, batch)
    assert (found.status, found.running) == (CANCELING, 1)
    assert store.batch_finish(running, SUCCEEDED, NOW + 4) is not None
    assert (record(store, batch).status, record(store, batch).canceled) == (ENDED, 2)


def test_an_item_given_back_while_canceling_is_not_taken_for_a_lost_runner(store):
    batch = new_batch(store, 1, 3)
    first, second = store.batch_claim("a", NOW, LEASE, 2)
    store.batch_cancel(batch, NOW + 1)
    store.batch_release("a", first, NOW + 2, now=NOW + 2)
    store.batch_sweep(NOW + 3)
    found = record(store, batch)
    assert (found.status, found.running) == (CANCELING, 1)
    store.batch_sweep(NOW + LEASE + 1)  # second's runner is gone
    found = record(store, batch)
    assert (found.status, found.ended_at, found.canceled) == (ENDED, NOW + LEASE + 1, 3)


def another_worker(store: Store) -> Store:
    """A second connection to the same store, as another worker's."""
    if isinstance(store, SQLiteStore):
        return SQLiteStore(os.path.dirname(store.path))
    assert isinstance(store, RedisStore)
    where = store.redis.connection_pool.connection_kwargs
    return RedisStore(f"redis://{where['host']}:{where['port']}", prefix=store.prefix)


def test_workers_claiming_at_once_never_get_the_same_item(store):
    batch = new_batch(store, 1, 300)
    workers = [store, another_worker(store), another_worker(store)]
    taken: list[list[int]] = [[] for _ in workers]

    def run(n: int) -> None:
        while claims := workers[n].batch_claim(f"w{n}", NOW, LEASE, 7):
            taken[n] += [c.index for c in claims]
            for claim in claims:
                workers[n].batch_finish(claim, SUCCEEDED, NOW + 1)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(len(workers))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for worker in workers[1:]:
        worker.close()
    assert sorted(i for got in taken for i in got) == list(range(300))
    found = record(store, batch)
    assert (found.status, found.succeeded, found.running) == (ENDED, 300, 0)


def test_the_census_counts_batches_by_status_and_finds_the_oldest_running(store):
    assert store.batch_census().by_status == {"in_progress": 0, "canceling": 0, "ended": 0}
    assert store.batch_census().oldest_open is None
    first = new_batch(store, 1, 1, at=NOW)
    new_batch(store, 2, 1, at=NOW + 10)
    third = new_batch(store, 3, 1, at=NOW + 20)
    store.batch_cancel(first, NOW + 30)  # nothing runs: it ends at once
    second_claim = store.batch_claim("a", NOW + 30, LEASE, 1)
    assert [c.batch_id for c in second_claim] == [batch_id(2)]
    store.batch_cancel(batch_id(2), NOW + 31)  # its item runs: canceling until it finishes
    store.batch_cancel(third, NOW + 31)
    census = store.batch_census()
    assert census.by_status == {"in_progress": 0, "canceling": 1, "ended": 2}
    assert census.oldest_open == NOW + 10
