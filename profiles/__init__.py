"""Device knowledge: device tables as TOML data (profiles/data), GPU/Jetson/host detection, the
usable memory of a device. No torch; nothing is read until a function is called.

Import from the modules: `elastic.profiles.devices` (DeviceProfile, Capability, load_profiles,
get_profile, match_profile), `elastic.profiles.detect` (detect, Detection, Device, Roots),
`elastic.profiles.target` (Target, resolve_target), `elastic.profiles.errors` (ProfileError).
Nothing is re-exported here: a `detect` function would hide the `detect` module.
"""
