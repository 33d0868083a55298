"""Planning person merges and group updates against what was already sent.

A translated block says which device/user pairs and groups it saw
(`BlockResult.merges`, `.groups`). `plan_identities` looks them up in the
store's history and returns only what PostHog has not been told yet, as
serialized events, with what to record once PostHog accepts them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import orjson

from .store import HourWriter
from .translate import GroupUpdate, Merge, group_event, merge_event, properties_digest


@dataclass(frozen=True)
class IdentityPlan:
    events: list[bytes] = field(default_factory=list)  # $create_alias, then $groupidentify
    links: list[tuple[str, str]] = field(default_factory=list)  # (device_id, user_id) to record
    digests: dict[tuple[str, str], str] = field(default_factory=dict)  # group -> digest to record
    conflicts: int = 0  # pairs not merged: the device already belongs to another user


def latest_group_updates(groups: list[GroupUpdate]) -> dict[tuple[str, str], GroupUpdate]:
    """(type, key) -> its last update with properties, or its first sighting if none had any."""
    latest: dict[tuple[str, str], GroupUpdate] = {}
    for update in groups:
        key = (update.group_type, update.group_key)
        if update.properties is not None or key not in latest:
            latest[key] = update
    return latest


def plan_identities(merges: list[Merge], groups: list[GroupUpdate], writer: HourWriter,
                    resend: bool = False) -> IdentityPlan:
    """Merges for devices never merged before, and updates for groups PostHog does not hold as seen.

    `merges` holds each pair of a block once, in order of first appearance, with
    its earliest timestamp. A device already merged into one user is not merged
    into a second (shared devices, account switches): it counts as a conflict.

    A group exists in PostHog only once a `$groupidentify` named it, so every
    group gets one the first time it is seen, with `$group_set: {}` when the
    event had no properties for it, and another whenever its properties differ
    from the last ones sent. A sighting of a known group is not a change.

    `resend` (a repair of a delivered hour): a group update goes again only when
    it is the state last sent, so a repair never sets a group back to an older state.
    """
    if not merges and not groups:
        return IdentityPlan()
    first: dict[str, Merge] = {}
    for merge in merges:
        first.setdefault(merge.device_id, merge)
    known = writer.linked_users(first) if first else {}
    new = [m for device, m in first.items() if device not in known]
    linked = {**known, **{m.device_id: m.user_id for m in new}}
    conflicts = sum(1 for m in merges if linked[m.device_id] != m.user_id)

    latest = latest_group_updates(groups)
    sent = writer.group_digests(latest) if latest else {}
    changed: dict[tuple[str, str], str] = {}
    for key, update in latest.items():
        if update.properties is None:
            if key in sent and not resend:
                continue
            update = latest[key] = update._replace(properties={})
        digest = properties_digest(update.properties)
        if (sent.get(key) == digest) == resend:
            changed[key] = digest

    events = [orjson.dumps(merge_event(m)) for m in new]
    events += [orjson.dumps(group_event(latest[key], digest)) for key, digest in changed.items()]
    return IdentityPlan(events, [(m.device_id, m.user_id) for m in new], changed, conflicts)
