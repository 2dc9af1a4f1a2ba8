"""Registers SectionBlockTimetable with Airflow: custom timetables must come from a plugin to be serialized.

The scheduler, the DAG processor and the API server all load this folder (AIRFLOW__CORE__PLUGINS_FOLDER
pointing at plugins/; scripts/embedded.py sets it). Without it the `seamless_align_blocks` DAG fails to
import with "Timetable class 'operators.section_timetable.SectionBlockTimetable' is not registered".
"""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from operators.section_timetable import SectionBlockTimetable


class SeamlessTimetablesPlugin(AirflowPlugin):
    name = "seamless_timetables"
    timetables = [SectionBlockTimetable]
