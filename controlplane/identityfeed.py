"""Identity as a versioned stream of deltas: what changed since the version an agent holds.

The registry can always build the whole IdentitySnapshot; sending it on every change costs every
agent the whole cluster per change (a rollout in a 5,000-pod cluster would resend 5,000 pods to
every node several times a second). `IdentityFeed.update(snapshot)` diffs the new snapshot against
the last one entry by entry (pods by uid, services by namespace/name, the mesh config, the
captured namespaces); a non-empty difference becomes version N+1. `message_for(version)` answers
what an agent holding `version` needs: nothing, one delta composed of every change since (from a
bounded history), or a full snapshot when that history no longer reaches back (or the agent holds
nothing, or another epoch).

What goes on the wire is encoded once per (version held, version) and the same bytes go to every
agent (`encoded_message_for`); a snapshot's bytes are the entries' bytes concatenated (protobuf's
repeated fields are their elements' encodings one after another), not a message built and
serialized. Agents that offer "zlib" in their hello get a big message as CompressedIdentity,
compressed once per version too (a 50,000-pod snapshot: ~11 MB plain, see docs/scale.md).

The epoch is random per controller process: versions of a restarted controller mean nothing to
an agent that held the previous one's, and the agent's delta check (epoch and base_version must
match what it holds) makes it ask for a full snapshot instead of applying a delta to the wrong
base.
"""

from __future__ import annotations

import random
import zlib
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TypeVar

from nodemesh.api.gen import nodemesh_pb2 as pb
from nodemesh.controlplane.registry import IdentityEntries

PodKey = str                    # uid
ServiceKey = tuple[str, str]    # (namespace, name)
_K = TypeVar("_K", str, tuple[str, str])

ZLIB = "zlib"
# Identity messages smaller than this go plain even to agents that take zlib: a delta of a few
# pods gains little, and compressing it per version would cost more than it saves.
COMPRESS_MIN_BYTES = 32 * 1024
COMPRESS_LEVEL = 6   # 50,000 pods: ~11 MB -> ~1 MB (level 1: ~1.5 MB); measured in docs/scale.md


def _varint(n: int) -> bytes:
    """Protobuf's base-128 varint (a length prefix of a length-delimited field)."""
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(tag: bytes, data: bytes) -> bytes:
    return tag + _varint(len(data)) + data


# Length-delimited field keys: (field number << 3) | 2.
_SNAPSHOT_PODS, _SNAPSHOT_SERVICES, _SNAPSHOT_CONFIG = b"\x12", b"\x1a", b"\x22"
_MESSAGE_IDENTITY = b"\x0a"


@dataclass(slots=True)
class _Change:
    version: int
    pods: dict[PodKey, bytes | None] = field(default_factory=dict)        # None: removed
    services: dict[ServiceKey, bytes | None] = field(default_factory=dict)
    config: bytes | None = None
    namespaces: tuple[str, ...] | None = None

    def size(self) -> int:
        return len(self.pods) + len(self.services) + 1


class IdentityFeed:
    """The current identity (as serialized entries), its version, and recent changes."""

    def __init__(self, history: int = 256, max_history_entries: int = 50_000,
                 epoch: int | None = None) -> None:
        self.epoch = epoch if epoch is not None else random.getrandbits(63) or 1
        self.version = 0
        self._pods: dict[PodKey, bytes] = {}
        self._services: dict[ServiceKey, bytes] = {}
        self._config = b""
        self._namespaces: tuple[str, ...] = ()
        self._resource_version = ""
        self._history: deque[_Change] = deque()
        self._history_max = history
        self._history_entries_max = max_history_entries
        self._history_entries = 0
        self._snapshot: pb.IdentitySnapshot | None = None
        # Encoded messages of the current version, by the version an agent holds (0: snapshot):
        # a thousand agents at the same version get the same bytes, encoded once.
        self._encoded: dict[int, tuple[bytes, bool]] = {}
        self._compressed: dict[int, bytes] = {}   # the same, as ControllerMessage.identity_compressed
        self._entries_source, self._entries_generation = 0, 0   # which registry's entries we hold, and when

    # ------------------------------------------------------------------ input
    def update(self, snap: pb.IdentitySnapshot) -> bool:
        """Take a whole snapshot; True when it changed anything agents hold."""
        return self.update_entries(IdentityEntries(
            snap.resource_version,
            {p.uid or f"{p.namespace}/{p.name}": p.SerializeToString(deterministic=True) for p in snap.pods},
            {(s.namespace, s.name): s.SerializeToString(deterministic=True) for s in snap.services},
            snap.config.SerializeToString(deterministic=True), tuple(snap.captured_namespaces)))

    def update_entries(self, entries: IdentityEntries) -> bool:
        """Take the registry's identity as serialized entries (`WorkloadRegistry.identity_entries`:
        only changed pods are re-serialized there); True when it changed anything agents hold."""
        self._resource_version = entries.resource_version
        pods, services, config, namespaces = entries.pods, entries.services, entries.config, entries.namespaces
        change = _Change(self.version + 1)
        hint = entries.changed_since(self._entries_generation) if entries.source == self._entries_source else None
        self._entries_source, self._entries_generation = entries.source, entries.generation
        if hint is None:  # first entries, or from another registry: diff everything
            pod_keys: Iterable[PodKey] = pods.keys() | self._pods.keys()
            service_keys: Iterable[ServiceKey] = services.keys() | self._services.keys()
        else:             # only the entries the registry says changed since the ones we hold
            pod_keys, service_keys = hint
        for key in pod_keys:
            data, old = pods.get(key), self._pods.get(key)
            if old is not data and old != data:
                change.pods[key] = data
        for skey in service_keys:
            sdata, sold = services.get(skey), self._services.get(skey)
            if sold is not sdata and sold != sdata:
                change.services[skey] = sdata
        if config != self._config:
            change.config = config
        if namespaces != self._namespaces:
            change.namespaces = namespaces
        if not change.pods and not change.services and change.config is None and change.namespaces is None:
            return False
        # Ours, not the registry's (its dicts go on changing): copied after a full diff, else
        # only the changed entries applied.
        if hint is None:
            self._pods, self._services = dict(pods), dict(services)
        else:
            _apply(self._pods, change.pods)
            _apply(self._services, change.services)
        self._config, self._namespaces = config, namespaces
        self.version = change.version
        self._snapshot = None
        self._encoded.clear()
        self._compressed.clear()
        self._history.append(change)
        self._history_entries += change.size()
        while self._history and (len(self._history) > self._history_max
                                 or self._history_entries > self._history_entries_max):
            self._history_entries -= self._history.popleft().size()
        return True

    # ------------------------------------------------------------------ output
    def snapshot(self) -> pb.IdentitySnapshot:
        """The whole identity at the current version (built once per version)."""
        if self._snapshot is None:
            snap = pb.IdentitySnapshot(resource_version=self._resource_version, epoch=self.epoch,
                                       version=self.version)
            snap.pods.extend(pb.Pod.FromString(b) for b in self._pods.values())
            snap.services.extend(pb.Service.FromString(b) for b in self._services.values())
            snap.config.MergeFromString(self._config)
            snap.captured_namespaces.extend(self._namespaces)
            self._snapshot = snap
        return self._snapshot

    def delta_since(self, version: int) -> pb.IdentityDelta | None:
        """Every change after `version` in one delta; None when the history does not reach back."""
        if version == self.version:
            return pb.IdentityDelta(epoch=self.epoch, base_version=version, version=version)
        if not self._history or self._history[0].version > version + 1 or version > self.version:
            return None
        pods: dict[PodKey, bytes | None] = {}
        services: dict[ServiceKey, bytes | None] = {}
        config: bytes | None = None
        namespaces: tuple[str, ...] | None = None
        for change in self._history:
            if change.version <= version:
                continue
            pods.update(change.pods)
            services.update(change.services)
            if change.config is not None:
                config = change.config
            if change.namespaces is not None:
                namespaces = change.namespaces
        delta = pb.IdentityDelta(epoch=self.epoch, base_version=version, version=self.version)
        for key, data in pods.items():
            if data is None:
                delta.removed_pods.append(key)
            else:
                delta.pods.append(pb.Pod.FromString(data))
        for (ns, name), data in services.items():
            if data is None:
                delta.removed_services.append(pb.Resource(namespace=ns, type="service", name=name))
            else:
                delta.services.append(pb.Service.FromString(data))
        if config is not None:
            delta.config.MergeFromString(config)
        if namespaces is not None:
            delta.namespaces_changed = True
            delta.captured_namespaces.extend(namespaces)
        return delta

    def snapshot_bytes(self) -> bytes:
        """ControllerMessage{identity: the snapshot}, serialized: the held entries' bytes
        concatenated after the header, no Pod message built (parsing 50,000 pods into a snapshot
        to serialize them again cost ~0.5 s and ~100 MB per version)."""
        head = pb.IdentitySnapshot(resource_version=self._resource_version, epoch=self.epoch,
                                   version=self.version, captured_namespaces=self._namespaces)
        parts = [head.SerializeToString(), _field(_SNAPSHOT_CONFIG, self._config)]
        parts.extend(_field(_SNAPSHOT_PODS, b) for b in self._pods.values())
        parts.extend(_field(_SNAPSHOT_SERVICES, b) for b in self._services.values())
        return _field(_MESSAGE_IDENTITY, b"".join(parts))

    def encoded_message_for(self, epoch: int, version: int,
                            encodings: frozenset[str] = frozenset()) -> tuple[bytes, bool] | None:
        """`message_for`, serialized (bytes, is_snapshot): built and encoded once per (version
        held, current version) however many agents ask — a 50,000-pod snapshot is megabytes,
        and encoding it per agent was most of a controller's work when agents connect. With
        "zlib" in `encodings` (the agent's hello offered it) a message of COMPRESS_MIN_BYTES or
        more comes as ControllerMessage.identity_compressed, compressed once per version too."""
        if epoch == self.epoch and version == self.version:
            return None
        held = version if epoch == self.epoch else 0
        cached = self._encoded.get(held)
        if cached is None:
            if len(self._encoded) >= 64:
                self._encoded.clear()
                self._compressed.clear()
            delta = self.delta_since(held) if held else None
            if delta is None:  # holds nothing of ours, or is behind the history: the snapshot
                cached = self._encoded.get(0)
                if cached is None:
                    cached = self._encoded[0] = (self.snapshot_bytes(), True)
            else:
                cached = (pb.ControllerMessage(identity_delta=delta).SerializeToString(), False)
            self._encoded[held] = cached
        if ZLIB not in encodings or len(cached[0]) < COMPRESS_MIN_BYTES:
            return cached
        key = 0 if cached[1] else held   # every agent that needs the snapshot shares one
        compressed = self._compressed.get(key)
        if compressed is None:
            compressed = self._compressed[key] = pb.ControllerMessage(identity_compressed=pb.CompressedIdentity(
                encoding=ZLIB, data=zlib.compress(cached[0], COMPRESS_LEVEL), size=len(cached[0]))).SerializeToString()
        return compressed, cached[1]

    def message_for(self, epoch: int, version: int) -> pb.ControllerMessage | None:
        """What an agent holding (epoch, version) needs: None when it is current, else a delta,
        or a full snapshot when it holds nothing of this epoch or is behind our history."""
        if epoch == self.epoch and version == self.version:
            return None
        delta = self.delta_since(version) if epoch == self.epoch and version else None
        if delta is None:
            return pb.ControllerMessage(identity=self.snapshot())
        return pb.ControllerMessage(identity_delta=delta)


def _apply(held: dict[_K, bytes], changes: dict[_K, bytes | None]) -> None:
    for key, data in changes.items():
        if data is None:
            held.pop(key, None)
        else:
            held[key] = data
