"""Tools around the bridge: `bridge dev` and its embedded broker, `bridge bench` with its baseline and load
generator."""
