"""Device knowledge: device tables as TOML data, GPU/Jetson/host detection. No torch import;
nothing here yet."""
