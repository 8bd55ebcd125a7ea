"""The device a plan is for, decided once: a device profile (``--target``) or the device detected
here (``--gpu`` picks among several). Every command resolves it with :func:`resolve_target` at its
front end and hands the :class:`Target` down; nothing below detects again. No torch, no slicer.

Example:
    >>> from elastic.profiles.devices import get_profile
    >>> t = Target.from_profile(get_profile("orin-nano-8gb"))
    >>> t.kind, t.caps.bf16, t.caps.fp8
    ('jetson', True, False)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from elastic.profiles.devices import Capability, flat_caps
from elastic.profiles.units import gib


@dataclass(frozen=True)
class Target:
    """The device a plan is for: detected here, or a profile for a device you do not have."""

    name: str
    kind: str  # "gpu" | "jetson" | "cpu"
    usable_bytes: int  # what the model may use (after the OS/driver reserve, or free now)
    overhead_bytes: int  # runtime overhead: CUDA context + workspace, or the CPU runtime
    caps: Capability  # the precisions it runs: its profile's, or the detected device's
    unified: bool  # GPU memory is the system RAM (Jetson)
    source: str  # "detected" or "profile"
    notes: tuple[str, ...] = ()
    profile: str | None = None  # the profile's name (`--target`), None when detected
    runtimes: dict[str, tuple[str, ...]] = field(default_factory=dict, hash=False)  # precision -> runtimes
    engines: tuple[str, ...] = ()  # engines that run here, preferred first (empty: its kind's; planning.engines)

    @classmethod
    def from_profile(cls, profile) -> Target:
        """Plan for a device profile (``profiles.devices.DeviceProfile``): usable = memory - reserve."""
        return cls(
            name=profile.display_name, kind=profile.kind,
            usable_bytes=max(0, profile.memory_bytes - profile.reserve_bytes),
            overhead_bytes=profile.runtime_overhead_bytes, caps=profile.caps,
            unified=profile.unified, source="profile", profile=profile.name,
            notes=(f"profile {profile.name}: {gib(profile.memory_bytes, 1)}, "
                   f"{gib(profile.reserve_bytes, 1)} kept for the OS/driver",),
            runtimes=dict(profile.runtimes), engines=tuple(profile.engines),
        )

    @classmethod
    def from_device(cls, device) -> Target:
        """Plan for a detected device (``profiles.detect.Device``); its matched profile, if any, says
        which runtimes and engines run there."""
        profile = device.profile
        return cls(
            name=device.name, kind=device.kind, usable_bytes=device.usable_bytes,
            overhead_bytes=device.runtime_overhead_bytes, caps=device.caps,
            unified=device.unified, source="detected", notes=tuple(device.notes),
            runtimes=dict(profile.runtimes) if profile is not None else {},
            engines=tuple(profile.engines) if profile is not None else (),
        )

    def to_json(self) -> dict[str, Any]:
        """The "device" object of `elastic plan --json`: every field, the six capability flags as keys
        of their own (where they have always been), notes as a list."""
        return {**flat_caps(asdict(self), self.caps, after=("overhead_bytes", "profile")), "notes": list(self.notes)}


target_from_profile, target_from_device = Target.from_profile, Target.from_device  # the names planning used


def resolve_target(target: str | None, gpu: int | None = None):
    """The planning target: the profile named ``target``, or this machine (detected; ``gpu``
    picks among several). Returns (Target, the Detection or None for a profile).

    Raises:
        ProfileError: an unknown profile name (the message lists them), or ``gpu`` names no GPU here.
    """
    if target:
        from elastic.profiles.devices import get_profile

        return Target.from_profile(get_profile(target)), None
    from elastic.profiles.detect import detect

    detection = detect(gpu=gpu)
    return Target.from_device(detection.chosen), detection
