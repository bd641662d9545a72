"""The hostile-client suite: raw RPC frames, as an attacker would send them (issues 9, 10)."""
