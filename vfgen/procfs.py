"""The process table as /proc shows it: every process's stat fields, read once."""

from __future__ import annotations

import os

# Indexes into the fields that follow the parenthesised command name in /proc/PID/stat
# (proc(5) numbers them from 3 on).
STATE, PPID, PGRP, SESSION, UTIME, STIME = 0, 1, 2, 3, 11, 12


def stat_fields() -> dict[int, list[str]]:
    """PID -> its /proc/PID/stat fields after the command name, for every process still there."""
    table: dict[int, list[str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                stat = handle.read()
        except OSError:
            continue  # gone meanwhile
        # The command name may hold spaces and parentheses: split after its last ')'.
        table[int(entry)] = stat[stat.rindex(")") + 2:].split()
    return table


def children(pid: int) -> list[int]:
    return [p for p, fields in stat_fields().items() if int(fields[PPID]) == pid]
