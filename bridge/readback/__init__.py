"""The read side: decoding records into events, the reader library, and the `consume` and `replay` commands
with their sinks, progress and durable files."""
