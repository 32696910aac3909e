"""Key names of one queue: the only place they are spelled.

Keys of queue Q (``{Q}`` is a Redis Cluster hash tag, so every key of a queue
lives in one slot and every multi-key script works on a cluster)::

    sq:{Q}:j:<id>              hash    one JobRecord; None fields are absent
    sq:{Q}:d:<route>           zset    pending records anyone may claim, score = due
    sq:{Q}:d:<route>:<target>  zset    pending broadcast records for one worker
    sq:{Q}:t:<route>           set     targets that ever had a broadcast on the route (for purge)
    sq:{Q}:n:<route>[:<tgt>]   list    wake-up tokens idle workers block on (BLPOP)
    sq:{Q}:lease               zset    running records, score = lease_until
    sq:{Q}:jobs                zset    every record, score = +inf or when it expires (counts, list_jobs)
    sq:{Q}:fired               zset    every record, score 0: lexical order is id (fired) order, for the
                                       monitor's newest-first pages (list_page(newest=True))
    sq:{Q}:fired_indexed       string  set once "fired" covers records stored before it existed
    sq:{Q}:done:<id>           list    one token while a record is finished; sync waiters BLMOVE on it
    sq:{Q}:done:               channel finish publishes each finished id; one asyncio subscriber per loop
    sq:{Q}:workers, sq:{Q}:w:<id>      worker registry (set of ids, one hash per worker)
    sq:{Q}:k:<key>             string  id of the record holding an idempotency key (expires with it)
    sq:{Q}:settings            hash    the queue's settings (name -> value)
    sq:{Q}:s:<minute>          hash    throughput counters of one minute, field <counter>:<route>
    sq:{Q}:stats               zset    minutes that have counters, score = member = the minute
    sq:{Q}:c:<route>:<state>   zset    the monitor's index: the route's records in a state (or 'dead'),
                                       score = due (pending), +inf (running), expiry (finished)
    sq:{Q}:routes              set     routes that ever had a record (the index's routes)
    sq:{Q}:tallied             string  set once the index covers records stored before it existed
    sq:{Q}:deps:<id>           set     workflows: ids of the records waiting (or that waited) for <id>
    sq:{Q}:settled:<id>        hash    workflows: the set of <id>'s finished parents, id -> how it ended
                                       (scripts/release.lua names these two from the job prefix)
    sq:{Q}:p:<route>[:<tgt>]   zset    flow: the priorities other than 0 that the route's shared (or one
                                       worker's broadcast) pending records have or had, member = score =
                                       the priority
    sq:{Q}:dp:<route>:<prio>[:<tgt>]  zset  flow: pending records of one priority other than 0, score =
                                       due (priority 0 stays in d:<route>[:<target>])
    sq:{Q}:lk:<limit key>      zset    flow: running records holding a slot of the key, score = lease_until
                                       (a slot is a live lease: renew and finish keep it right)
    sq:{Q}:rt:<name>           string  flow: a GCRA time (skunkqueue.flow.key_tat/route_tat names)

The monitor's running index (c:<route>:running) is scored by lease_until, so
it also counts a route's live leases for the route's own concurrency limit.

An idempotency key's string only finds its holder; the holder's hash, while it
exists and names the same key, is what holds the key (see scripts/enqueue.lua).

Route and target names are %-escaped (``%`` and ``:``) so they cannot run into
each other; the queue's name in the tag also has its braces escaped. The
scripts get the prefixes as arguments (:meth:`Keys.layout`) instead of
spelling them again; they only repeat the escaping rule.
"""

from __future__ import annotations

from urllib.parse import unquote


def escape(name: str) -> str:
    """A route or target name that contains no ':' (the separator) and so cannot collide."""
    return name.replace("%", "%25").replace(":", "%3A")


def hash_tag(queue: str) -> str:
    """The queue's name as the content of a Cluster hash tag: no '{' or '}', never empty.

    Redis hashes only what lies between the first '{' and the next '}', so a
    brace in the name would cut the tag short (``}x`` gave an empty tag and
    keys spread over many slots). Escaping keeps the tag the whole name.
    """
    return escape(queue).replace("{", "%7B").replace("}", "%7D")


def stat_field(counter: str, route: str) -> str:
    """A counter's field in a minute's hash: counter names have no ':', routes are escaped."""
    return f"{counter}:{escape(route)}"


def parse_stat_field(field: str) -> tuple[str, str]:
    """(counter, route) of a field made by stat_field."""
    counter, _, route = field.partition(":")
    # escape() turned every '%' into '%25', so the only escapes are its own: unquote undoes exactly them.
    return counter, unquote(route)


class Keys:
    """Key names of one queue."""

    def __init__(self, queue: str) -> None:
        self.base = f"sq:{{{hash_tag(queue)}}}:"
        self.job_prefix = self.base + "j:"
        self.due_prefix = self.base + "d:"
        self.notify_prefix = self.base + "n:"
        self.targets_prefix = self.base + "t:"
        self.done_prefix = self.base + "done:"
        self.lease = self.base + "lease"
        self.index = self.base + "jobs"
        self.fired = self.base + "fired"
        self.fired_indexed = self.base + "fired_indexed"
        self.workers = self.base + "workers"
        self.key_prefix = self.base + "k:"
        self.settings = self.base + "settings"
        self.stats_prefix = self.base + "s:"
        self.stats = self.base + "stats"
        self.tally_prefix = self.base + "c:"
        self.routes = self.base + "routes"
        self.tallied = self.base + "tallied"
        self.deps_prefix = self.base + "deps:"
        self.levels_prefix = self.base + "p:"
        self.level_due_prefix = self.base + "dp:"
        self.slots_prefix = self.base + "lk:"
        self.rate_prefix = self.base + "rt:"

    def layout(self) -> list[str]:
        """The prefixes and keys every script receives first (see scripts/common.lua)."""
        return [self.job_prefix, self.due_prefix, self.notify_prefix, self.targets_prefix,
                self.done_prefix, self.lease, self.index, self.key_prefix]

    def tally_layout(self) -> list[str]:
        """The monitor's index names every script receives after layout()'s and the constants."""
        return [self.tally_prefix, self.routes]

    def flow_layout(self) -> list[str]:
        """The flow control names every script receives after tally_layout()'s."""
        return [self.levels_prefix, self.level_due_prefix, self.slots_prefix, self.rate_prefix, self.settings]

    def levels(self, route: str, target: str | None = None) -> str:
        return self.levels_prefix + self._suffix(route, target)

    def level_due(self, route: str, priority: int, target: str | None = None) -> str:
        """The due zset of the route's shared (or ``target``'s broadcast) records of ``priority``
        (0: :meth:`due`)."""
        if priority == 0:
            return self.due(route, target)
        key = f"{self.level_due_prefix}{escape(route)}:{priority}"
        return key if target is None else f"{key}:{escape(target)}"

    def slots(self, limit_key: str) -> str:
        return self.slots_prefix + limit_key

    def rate(self, name: str) -> str:
        return self.rate_prefix + name

    def tally(self, route: str, state: str) -> str:
        return f"{self.tally_prefix}{escape(route)}:{state}"

    def job(self, job_id: str) -> str:
        return self.job_prefix + job_id

    def deps(self, job_id: str) -> str:
        return self.deps_prefix + job_id

    def done(self, job_id: str) -> str:
        return self.done_prefix + job_id

    def minute(self, minute: int) -> str:
        return f"{self.stats_prefix}{minute}"

    def worker(self, worker_id: str) -> str:
        return f"{self.base}w:{worker_id}"

    @staticmethod
    def _suffix(route: str, target: str | None) -> str:
        return escape(route) if target is None else f"{escape(route)}:{escape(target)}"

    def due(self, route: str, target: str | None = None) -> str:
        return self.due_prefix + self._suffix(route, target)

    def notify(self, route: str, target: str | None = None) -> str:
        return self.notify_prefix + self._suffix(route, target)

    def targets(self, route: str) -> str:
        return self.targets_prefix + escape(route)
