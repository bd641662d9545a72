"""Back ends: where virtual tokens' work is done. All implement :class:`base.Backend`."""
