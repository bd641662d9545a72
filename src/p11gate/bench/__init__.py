"""`p11gate bench`: the same operations against the module, `p11-kit server` and p11gate."""
