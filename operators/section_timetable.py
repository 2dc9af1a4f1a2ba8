"""SectionBlockTimetable: one partitioned run per block of sections, created by backfills only.

Airflow backfills walk a timetable's dates. This timetable gives block b of a project the partition date
EPOCH + b days (EPOCH = 2000-01-01 UTC) and the partition key `sections 11-20 (block 1)`, so
`airflow backfill create --from-date D1 --to-date D2` (or the UI's backfill dialog) creates one run per
block in that date range, each labelled by its sections; `seamless backfill --z A:B` translates a section
range into those dates (seamless_core.block_runs). It never schedules a run by itself (`can_be_scheduled`
is False) but is periodic, which is what Airflow's backfill requires. Partitioned (not data-interval)
runs were chosen because Airflow asks a partitioned timetable for the backfill run ids, so the run id
names the sections too, and a reprocessed block gets a new run next to the old one.

A custom timetable must be registered with Airflow for DAG serialization: plugins/seamless_timetables.py
does it, so AIRFLOW__CORE__PLUGINS_FOLDER must point at plugins/ (scripts/embedded.py and the tests set it).
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from airflow.exceptions import InvalidPartitionKeyError
from airflow.timetables.base import DagRunInfo, DataInterval, Timetable

from seamless_core.block_runs import EPOCH

if TYPE_CHECKING:
    from airflow.timetables.base import TimeRestriction
    from airflow.utils.types import DagRunType
    from pendulum import DateTime


def _utc(value: dt.datetime) -> DateTime:
    """Take a bound's wall-clock reading as UTC: a date picked as `2000-01-03` means block 2 in any timezone."""
    import pendulum

    return pendulum.datetime(value.year, value.month, value.day, value.hour, value.minute, value.second,
                             value.microsecond, tz="UTC")


class SectionBlockTimetable(Timetable):
    """Block b (in `keys` order) <-> partition date EPOCH + b days and partition key keys[b]."""

    periodic = True  # backfills are refused for non-periodic timetables
    can_be_scheduled = False  # no scheduled runs: only backfills (and triggers with a partition key)
    partitioned = True
    run_ordering: Sequence[str] = ("run_after", "start_date")

    def __init__(self, keys: Sequence[str], epoch: dt.datetime = EPOCH) -> None:
        if not keys:
            raise ValueError("a SectionBlockTimetable needs at least one block")
        if len(set(keys)) != len(keys):
            raise ValueError("partition keys of the blocks must be distinct")
        self.keys = tuple(keys)
        self.epoch = _utc(epoch)
        self._index = {k: i for i, k in enumerate(self.keys)}
        self.description = (f"one run per block of sections, {len(self.keys)} blocks: block b = partition date "
                            f"{self.epoch.date()} + b days; backfills only")

    # --- serialization (the plugin registers the class) -----------------------------------------
    @classmethod
    def deserialize(cls, data: dict[str, Any]) -> Timetable:
        return cls(data["keys"], dt.datetime.fromisoformat(data["epoch"]))

    def serialize(self) -> dict[str, Any]:
        return {"keys": list(self.keys), "epoch": self.epoch.isoformat()}

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SectionBlockTimetable):
            return NotImplemented
        return self.keys == other.keys and self.epoch == other.epoch

    __hash__ = None  # type: ignore[assignment]

    @property
    def summary(self) -> str:
        return f"section blocks ({len(self.keys)}, backfill only)"

    # --- the mapping ---------------------------------------------------------------------------
    def date_of(self, index: int) -> DateTime:
        return self.epoch.add(days=index)

    def index_of(self, key: str) -> int:
        try:
            return self._index[key]
        except KeyError:
            raise InvalidPartitionKeyError(f"partition key {key!r} is not a block of this DAG; its blocks are "
                                           f"{self.keys[0]!r} .. {self.keys[-1]!r}") from None

    def info(self, index: int) -> DagRunInfo:
        date = self.date_of(index)
        return DagRunInfo(run_after=date, data_interval=None, partition_date=date, partition_key=self.keys[index])

    def iter_partition_dagrun_infos(self, *, earliest: dt.datetime, latest: dt.datetime) -> Iterable[DagRunInfo]:
        """One run per block whose date lies in [earliest, latest], both included, in block order."""
        low, high = self.localize_partition_datetime(earliest), self.localize_partition_datetime(latest)
        for index in range(len(self.keys)):
            if low <= self.date_of(index) <= high:
                yield self.info(index)

    def localize_partition_datetime(self, value: dt.datetime) -> DateTime:
        return _utc(value)

    def _decode_partition_date(self, partition_key: str) -> dt.datetime:
        return self.date_of(self.index_of(partition_key))

    # --- never scheduled -----------------------------------------------------------------------
    def next_dagrun_info(self, *, last_automated_data_interval: DataInterval | None,
                         restriction: TimeRestriction) -> DagRunInfo | None:
        return None

    def next_dagrun_info_v2(self, *, last_dagrun_info: DagRunInfo | None,
                            restriction: TimeRestriction) -> DagRunInfo | None:
        return None

    def infer_manual_data_interval(self, *, run_after: DateTime) -> DataInterval:
        return DataInterval.exact(run_after)

    def generate_run_id(self, *, run_type: DagRunType, run_after: DateTime, data_interval: DataInterval | None,
                        **extra: Any) -> str:
        """`backfill__sections_11-20_block_1__20260701T101500_3fa2`: readable and unique (a reprocess adds one)."""
        key = extra.get("partition_key")
        stamp = f"{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S}_{uuid.uuid4().hex[:4]}"
        if not key:
            return run_type.generate_run_id(suffix=f"{run_after.isoformat()}_{stamp}")
        label = "".join(c if c.isalnum() or c in "-." else "_" for c in key).replace("__", "_").strip("_")
        return run_type.generate_run_id(suffix=f"{label}__{stamp}")
