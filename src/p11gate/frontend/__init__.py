"""The client-facing side: listeners, per-connection state, virtual tokens."""
